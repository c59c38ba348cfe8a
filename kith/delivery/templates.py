"""Email and HTML templates per brand, looked up and rendered the way Sydent does.

Operators keep their Sydent `res/` folder: a brand is a subfolder of `templates.path`,
`<brand>/<name>.j2` (Jinja2, autoescaped) wins over `<brand>/<name>` (Python
%-format, where every variable `v` also exists as `v_forhtml` and `v_forurl`), and the
deprecated `email.template`, `email.invite_template` and `[http]
verify_response_template` paths still override the lookup.  When `templates.path` does
not exist, kith's own templates (shipped inside the package) are used, so a fresh
install sends good mail with no setup.

Rendering reads files; the async wrappers run it in a thread so the event loop never
waits on the disk.
"""

from __future__ import annotations

import asyncio
import html
import logging
import secrets
import string
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import jinja2

from kith.config import KithConfig

log = logging.getLogger(__name__)

PACKAGED_TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
"""kith's default templates: `kith/templates/<brand>/`."""

PACKAGED_DEFAULT_BRAND = "matrix-org"

VERIFICATION_TEMPLATE = "verification_template.eml"
INVITE_TEMPLATE = "invite_template.eml"
VERIFY_RESPONSE_TEMPLATE = "verify_response_template.html"

_ALPHANUMERICS = string.ascii_letters + string.digits
_warned: set[str] = set()


class TemplateError(Exception):
    """A template is missing or cannot be rendered; the message names the file."""


def multipart_boundary() -> str:
    """32 random alphanumerics: user input in a mail cannot guess, and so end, a part."""
    return "".join(secrets.choice(_ALPHANUMERICS) for _ in range(32))


def _warn_once(key: str, message: str, *args: object) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message, *args)


class _PercentVariables(dict[str, str]):
    """A %-format mapping where an unknown `%(name)s` renders as "" (Jinja does the same)."""

    def __init__(self, variables: Mapping[str, str], source: str) -> None:
        super().__init__(variables)
        self.source = source

    def __missing__(self, key: str) -> str:
        _warn_once(f"{self.source}:{key}", "template %s uses %%(%s)s, which kith does not "
                   "provide: rendered empty", self.source, key)
        return ""


@dataclass(frozen=True)
class _Source:
    """Where a template was found and how it is rendered."""

    path: Path
    jinja: jinja2.Environment | None  # None: Python %-format
    jinja_name: str = ""


def _jinja_environment(root: Path) -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(root)), autoescape=True)


class Templates:
    """Finds `<brand>/<name>` templates and renders them with the given variables."""

    def __init__(self, path: str, brand_default: str, *, email_template: str = "",
                 invite_template: str = "", verify_response_template: str = "") -> None:
        root = Path(path)
        if root.is_dir():
            self.root = root
        else:
            if f"root:{path}" not in _warned:  # the normal case on a fresh install
                _warned.add(f"root:{path}")
                log.info("templates.path %r does not exist: using kith's packaged "
                         "templates", path)
            self.root = PACKAGED_TEMPLATES
        self.brands = _brands(self.root)
        self.brand_default = brand_default
        if brand_default not in self.brands:
            _warn_once(f"brand:{self.root}:{brand_default}", "brand.default %r is not a "
                       "folder of %s", brand_default, self.root)
        self._overrides = {
            VERIFICATION_TEMPLATE: email_template,
            INVITE_TEMPLATE: invite_template,
            VERIFY_RESPONSE_TEMPLATE: verify_response_template,
        }
        self._jinja = _jinja_environment(self.root)
        self._packaged_jinja = (self._jinja if self.root == PACKAGED_TEMPLATES
                                else _jinja_environment(PACKAGED_TEMPLATES))
        self._override_jinja: dict[Path, jinja2.Environment] = {}

    @classmethod
    def from_config(cls, config: KithConfig) -> Templates:
        return cls(config.general.templates_path, config.general.brand_default,
                   email_template=config.email.template,
                   invite_template=config.email.invite_template,
                   verify_response_template=config.http.verify_response_template)

    def brand(self, hint: str | None) -> str:
        """The brand to use for a request's `brand` hint: unknown hints get the default."""
        return hint if hint and hint in self.brands else self.brand_default

    def render(self, name: str, variables: Mapping[str, str],
               brand: str | None = None) -> str:
        """Render template `name` (e.g. `verification_template.eml`) for a brand hint.

        `multipart_boundary` is added unless given.  Raises TemplateError.
        """
        source = self._find(name, self.brand(brand), allow_jinja=True)
        values = {key: str(value) for key, value in variables.items()}
        values.setdefault("multipart_boundary", multipart_boundary())
        if source.jinja is not None:
            return _render_jinja(source, values)
        return _render_percent(source.path, _with_escaped_variants(values))

    def render_verify_response(self, message: str, brand: str | None = None) -> str:
        """The HTML page answering a click on an email link: %-format, only `message`.

        The message is html-escaped: it is plain text written by kith.
        """
        source = self._find(VERIFY_RESPONSE_TEMPLATE, self.brand(brand), allow_jinja=False)
        return _render_percent(source.path, {"message": html.escape(message)})

    async def render_async(self, name: str, variables: Mapping[str, str],
                           brand: str | None = None) -> str:
        return await asyncio.to_thread(self.render, name, variables, brand)

    async def render_verify_response_async(self, message: str,
                                           brand: str | None = None) -> str:
        return await asyncio.to_thread(self.render_verify_response, message, brand)

    def _find(self, name: str, brand: str, *, allow_jinja: bool) -> _Source:
        override = self._overrides.get(name, "")
        if override:
            return self._override_source(Path(override), allow_jinja=allow_jinja)
        found = _lookup(self.root, self._jinja, brand, name, allow_jinja)
        if found is not None:
            return found
        packaged_brand = brand if brand in _brands(PACKAGED_TEMPLATES) else PACKAGED_DEFAULT_BRAND
        found = _lookup(PACKAGED_TEMPLATES, self._packaged_jinja, packaged_brand, name,
                        allow_jinja)
        if found is None:
            raise TemplateError(f"no template {brand}/{name} in {self.root}")
        if self.root != PACKAGED_TEMPLATES:
            _warn_once(f"missing:{brand}/{name}", "no template %s/%s in %s: using kith's "
                       "packaged %s/%s", brand, name, self.root, packaged_brand, name)
        return found

    def _override_source(self, path: Path, *, allow_jinja: bool) -> _Source:
        """A deprecated explicit path: `.j2` files are Jinja, rooted at their folder."""
        if not (allow_jinja and path.name.endswith(".j2")):
            return _Source(path, None)
        folder = path.parent
        if folder not in self._override_jinja:
            self._override_jinja[folder] = _jinja_environment(folder)
        return _Source(path, self._override_jinja[folder], path.name)


def _brands(root: Path) -> frozenset[str]:
    try:
        return frozenset(p.name for p in root.iterdir()
                         if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return frozenset()


def _lookup(root: Path, jinja: jinja2.Environment, brand: str, name: str,
            allow_jinja: bool) -> _Source | None:
    if allow_jinja and (root / brand / f"{name}.j2").is_file():
        return _Source(root / brand / f"{name}.j2", jinja, f"{brand}/{name}.j2")
    if (root / brand / name).is_file():
        return _Source(root / brand / name, None)
    return None


def _render_jinja(source: _Source, values: Mapping[str, str]) -> str:
    assert source.jinja is not None
    try:
        return source.jinja.get_template(source.jinja_name).render(values)
    except jinja2.TemplateError as e:
        raise TemplateError(f"template {source.path}: {e}") from None


def _render_percent(path: Path, values: Mapping[str, str]) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeError) as e:
        raise TemplateError(f"template {path}: cannot read: {e}") from None
    try:
        return text % _PercentVariables(values, str(path))
    except (ValueError, TypeError) as e:
        raise TemplateError(f"template {path}: not a valid %-format template ({e}); "
                            "write a literal % as %%") from None


def _with_escaped_variants(values: Mapping[str, str]) -> dict[str, str]:
    """Sydent's %-format extras: `<v>_forhtml` (html-escaped), `<v>_forurl` (quoted)."""
    variants = dict(values)
    for key, value in values.items():
        variants[f"{key}_forhtml"] = html.escape(value)
        variants[f"{key}_forurl"] = urllib.parse.quote(value)
    return variants
