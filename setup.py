"""kith's one compiled part, the lookup probe (kith/_probe.c); everything else is in
pyproject.toml.  Without a C compiler the install goes on without it, and the lookup
index answers with numpy instead (docs/decisions.md)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("kith._probe", ["kith/_probe.c"], optional=True)])
