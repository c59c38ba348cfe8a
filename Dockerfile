# kith in a container, laid out as Sydent's image is: data and config in /data,
# configured by sydent.conf and the SYDENT_* variables.
#
#   docker build -t kith .
#   docker run -d -p 8090:8090 -v kith-data:/data -e SYDENT_SERVER_NAME=id.example.org kith
FROM python:3.11-slim

RUN useradd --system --uid 993 --user-group --home-dir /data --no-create-home kith \
    && mkdir -p /data && chown kith:kith /data

WORKDIR /opt/kith
COPY requirements.lock pyproject.toml README.md LICENSE ./
COPY kith ./kith
COPY setup.py ./
# (a C compiler for kith's compiled lookup probe, removed again once it is built)
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && pip install --no-cache-dir -r requirements.lock \
    && pip install --no-cache-dir --no-deps . \
    && apt-get purge -y --auto-remove gcc libc6-dev && rm -rf /var/lib/apt/lists/* \
    && rm -rf /root/.cache \
    && python -c "import kith._probe"

# First start writes /data/sydent.conf with every default and a new signing key.
ENV SYDENT_CONF=/data/sydent.conf \
    SYDENT_DB_PATH=/data/sydent.db \
    SYDENT_PID_FILE=/data/sydent.pid \
    PYTHONUNBUFFERED=1

USER kith
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8090

HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["kith", "healthcheck"]

ENTRYPOINT ["kith"]
CMD ["serve"]
