"""The model catalogue: every slug with its modality, parameters, price rule and backends.

The package ships ``catalogue.toml``; an operator file (setting ``catalogue_file``) is merged
over it by slug: a listed slug replaces the fields it names, a new slug adds a model.
Entries may name a ``template`` whose fields they inherit.
"""

from __future__ import annotations

import fnmatch
import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from hypereal.domain.errors import BadRequest, ModelRequired, UnsupportedModel

MODALITIES = ("chat", "image", "image-edit", "video", "audio", "3d")
JOB_MODALITIES = ("video", "audio", "3d")
PARAM_TYPES = ("string", "integer", "number", "boolean", "media", "media-list")


@dataclass(frozen=True)
class Param:
    """One model parameter with its type, bounds and default."""

    name: str
    type: str
    required: bool = False
    default: Any = None
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[Any, ...] | None = None
    max_length: int | None = None
    description: str = ""

    def public(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "type": self.type, "required": self.required}
        for key in ("default", "minimum", "maximum", "max_length"):
            if getattr(self, key) is not None:
                data[key] = getattr(self, key)
        if self.choices is not None:
            data["choices"] = list(self.choices)
        if self.description:
            data["description"] = self.description
        return data


@dataclass(frozen=True)
class PriceRule:
    """Fixed credits, credits per second of ``duration``, or per token (chat).

    Per token: ``base_credits`` for each message sent, plus the token cost in whole credits,
    floor((prompt * input + completion * output) / 1M USD / ``usd_per_credit``); see
    ``pricing.chat_price``.
    """

    credits: int | None = None
    credits_per_second: float | None = None
    minimum: int = 0
    base_credits: int | None = None
    input_usd_per_million: float | None = None
    output_usd_per_million: float | None = None
    usd_per_credit: float = 0.01

    @property
    def kind(self) -> str:
        if self.credits_per_second is not None:
            return "per_second"
        if self.base_credits is not None:
            return "per_token"
        return "fixed"

    def public(self) -> dict[str, Any]:
        data: dict[str, Any] = {"kind": self.kind}
        if self.kind == "fixed":
            data["credits"] = self.credits
        elif self.kind == "per_second":
            data.update(credits_per_second=self.credits_per_second, minimum=self.minimum)
        else:
            data.update(
                base_credits=self.base_credits,
                input_usd_per_million=self.input_usd_per_million,
                output_usd_per_million=self.output_usd_per_million,
                usd_per_credit=self.usd_per_credit,
            )
        return data


@dataclass(frozen=True)
class Binding:
    """A backend instance that can serve the model, and the model's id there."""

    backend: str
    upstream_model: str | None = None


@dataclass(frozen=True)
class PassThrough:
    """A pattern model forwarded to a hosted Hypereal account whose own price we do not know:
    ``max_credits`` is reserved, and the charge settles to the upstream's ``creditsUsed`` x
    ``markup`` (rounded up, at most the reservation)."""

    max_credits: int
    markup: float = 1.0

    def charge(self, upstream_credits: int | float | None) -> int:
        """Credits to charge for an answer the upstream billed ``upstream_credits`` for
        (the whole reservation when the upstream did not say)."""
        if upstream_credits is None:
            return self.max_credits
        return min(self.max_credits, math.ceil(upstream_credits * self.markup - 1e-9))

    def public(self) -> dict[str, Any]:
        return {"max_credits": self.max_credits, "markup": self.markup}


@dataclass(frozen=True)
class ModelSpec:
    slug: str
    name: str
    modality: str
    description: str
    price: PriceRule
    params: tuple[Param, ...]
    bindings: tuple[Binding, ...]
    # Jobs of this model running at once, all workers together; None: the serving backend's
    # (BackendRegistry.concurrency).
    concurrency: int | None = None
    timeout_seconds: int = 1800
    context_tokens: int | None = None
    # Jobs: "async" (202 and a job to poll) or "sync" (the submission waits up to
    # sync_seconds for the job and answers 200 with its result; 202 past that).
    response: str = "async"
    sync_seconds: float = 0.0
    # Set on a model made from a pattern entry (the pattern it matched) and, for the hosted
    # Hypereal pass-through, how its charge settles.
    pattern: str | None = None
    pass_through: PassThrough | None = None

    @property
    def sync(self) -> bool:
        return self.response == "sync"

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


@dataclass(frozen=True)
class ModelPattern:
    """A catalogue entry matching slugs by a shell-style pattern (``claude-*``, ``gpt-*``,
    ``*``): a matched slug becomes a model of ``base`` (its modality, params, price) bound to
    ``backend``, with ``upstream_model`` (``{slug}`` replaced by the requested slug) as the
    model's id there."""

    pattern: str
    base: ModelSpec
    backend: str
    upstream_model: str = "{slug}"

    def matches(self, slug: str) -> bool:
        return fnmatch.fnmatchcase(slug, self.pattern)

    def spec_for(self, slug: str) -> ModelSpec:
        upstream = self.upstream_model.replace("{slug}", slug)
        return replace(
            self.base,
            slug=slug,
            name=slug,
            bindings=(Binding(self.backend, upstream),),
            pattern=self.pattern,
        )


# Slugs whose pattern lookup is remembered (matches and misses); past it the memory restarts.
PATTERN_CACHE_SIZE = 4096
# Longer slugs match no pattern (and are not remembered): no model id is this long.
MAX_PATTERN_SLUG = 256


@dataclass
class Catalogue:
    models: dict[str, ModelSpec]
    defaults: dict[str, str] = field(default_factory=dict)
    patterns: list[ModelPattern] = field(default_factory=list)
    _matched: dict[tuple[str, tuple[str, ...]], ModelSpec | None] = field(
        default_factory=dict, repr=False
    )

    def get(self, slug: str | None, modality: str | Sequence[str]) -> ModelSpec:
        """The model for a request, or the modality's default when ``slug`` is empty.

        Raises ModelRequired when there is no slug and no default, UnsupportedModel when the
        slug is unknown or of another modality.
        """
        modalities = (modality,) if isinstance(modality, str) else tuple(modality)
        if not slug:
            default = self.defaults.get(modalities[0])
            if default is None:
                raise ModelRequired()
            slug = default
        if not isinstance(slug, str):
            raise BadRequest("Invalid value for 'model': must be a string")
        spec = self.models.get(slug)
        if spec is not None and spec.modality in modalities:
            return spec
        check_text(slug, "model")
        if spec is None and self.patterns:
            spec = self.match(slug, modalities)
            if spec is not None:
                return spec
        raise UnsupportedModel(modalities[0], slug)

    def match(self, slug: str, modalities: tuple[str, ...] = MODALITIES) -> ModelSpec | None:
        """The model the first pattern entry of one of ``modalities`` matching ``slug``
        makes, or None; remembered per slug (at most PATTERN_CACHE_SIZE of them)."""
        if len(slug) > MAX_PATTERN_SLUG:
            return None
        key = (slug, modalities)
        try:
            return self._matched[key]
        except KeyError:
            pass
        found = next(
            (
                p.spec_for(slug)
                for p in self.patterns
                if p.base.modality in modalities and p.matches(slug)
            ),
            None,
        )
        if len(self._matched) >= PATTERN_CACHE_SIZE:
            self._matched.clear()
        self._matched[key] = found
        return found

    def find(self, slug: str) -> ModelSpec | None:
        """The model named ``slug`` (exact, else by pattern), of any modality, or None."""
        spec = self.models.get(slug)
        if spec is None and self.patterns:
            spec = self.match(slug)
        return spec

    def of_modality(self, modality: str) -> list[ModelSpec]:
        return [m for m in self.models.values() if m.modality == modality]


def _param(raw: Mapping[str, Any]) -> Param:
    if raw.get("type") not in PARAM_TYPES:
        raise ValueError(f"parameter {raw.get('name')!r}: type must be one of {PARAM_TYPES}")
    choices = raw.get("choices")
    return Param(
        name=str(raw["name"]),
        type=str(raw["type"]),
        required=bool(raw.get("required", False)),
        default=raw.get("default"),
        minimum=raw.get("minimum"),
        maximum=raw.get("maximum"),
        choices=tuple(choices) if choices is not None else None,
        max_length=raw.get("max_length"),
        description=str(raw.get("description", "")),
    )


def _model(slug: str, raw: Mapping[str, Any], pass_through: PassThrough | None = None) -> ModelSpec:
    modality = raw.get("modality")
    if modality not in MODALITIES:
        raise ValueError(f"model {slug!r}: modality must be one of {MODALITIES}")
    price = PriceRule(**raw.get("price", {}))
    if pass_through is not None and not raw.get("price"):
        price = PriceRule(credits=pass_through.max_credits)
    if price.kind == "fixed" and price.credits is None:
        raise ValueError(f"model {slug!r}: price needs credits, credits_per_second or base_credits")
    return ModelSpec(
        slug=slug,
        name=str(raw.get("name", slug)),
        modality=modality,
        description=str(raw.get("description", "")),
        price=price,
        params=tuple(_param(p) for p in raw.get("params", [])),
        bindings=tuple(Binding(**b) for b in raw.get("bindings", [])),
        concurrency=_concurrency(slug, raw.get("concurrency")),
        timeout_seconds=int(raw.get("timeout_seconds", 1800)),
        context_tokens=raw.get("context_tokens"),
        **_response(slug, raw),
        pass_through=pass_through,
    )


RESPONSES = ("async", "sync")
DEFAULT_SYNC_SECONDS = 120.0


def _response(slug: str, raw: Mapping[str, Any]) -> dict[str, Any]:
    """``response`` ("async" | "sync") and ``sync_seconds`` (a sync model's window)."""
    response = raw.get("response", "async")
    if response not in RESPONSES:
        raise ValueError(f"model {slug!r}: response must be one of {RESPONSES}")
    seconds = raw.get("sync_seconds", DEFAULT_SYNC_SECONDS if response == "sync" else 0.0)
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0:
        raise ValueError(f"model {slug!r}: sync_seconds must be a number of seconds >= 0")
    if response == "sync" and raw.get("modality") not in JOB_MODALITIES:
        raise ValueError(f"model {slug!r}: response = 'sync' applies to job models only")
    return {"response": response, "sync_seconds": float(seconds)}


def _concurrency(slug: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"model {slug!r}: concurrency must be a whole number of at least 1")
    return value


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Merge an operator document over the shipped one (models by slug, tables by key)."""
    merged = dict(base)
    for section in ("defaults", "templates"):
        merged[section] = {**base.get(section, {}), **override.get(section, {})}
    merged["patterns"] = [*base.get("patterns", []), *override.get("patterns", [])]
    models = {m["slug"]: dict(m) for m in base.get("models", [])}
    for entry in override.get("models", []):
        models[entry["slug"]] = {**models.get(entry["slug"], {}), **entry}
    merged["models"] = list(models.values())
    return merged


def parse_catalogue(document: Mapping[str, Any]) -> Catalogue:
    """Build a catalogue from a parsed TOML document. Raises ValueError on bad entries."""
    templates: Mapping[str, Mapping[str, Any]] = document.get("templates", {})
    models: dict[str, ModelSpec] = {}
    for entry in document.get("models", []):
        template_name = entry.get("template")
        if template_name is not None and template_name not in templates:
            raise ValueError(f"model {entry.get('slug')!r}: unknown template {template_name!r}")
        raw = {**templates.get(template_name or "", {}), **entry}
        models[raw["slug"]] = _model(raw["slug"], raw)
    defaults = dict(document.get("defaults", {}))
    for modality, slug in defaults.items():
        if slug not in models:
            raise ValueError(f"default {modality} model {slug!r} is not in the catalogue")
    patterns = [_pattern(entry, templates) for entry in document.get("patterns", [])]
    return Catalogue(models=models, defaults=defaults, patterns=patterns)


PATTERN_KEYS = ("pattern", "backend", "upstream_model", "pass_through")


def _pattern(entry: Mapping[str, Any], templates: Mapping[str, Mapping[str, Any]]) -> ModelPattern:
    """A ``[[patterns]]`` entry: ``pattern``, ``backend``, optional ``upstream_model``
    (``{slug}`` is the requested slug; default the slug itself), ``modality`` (default chat)
    or a ``template``, a ``price`` rule, or ``pass_through = {max_credits, markup}``."""
    pattern = entry.get("pattern")
    backend = entry.get("backend")
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"pattern entry {dict(entry)!r}: needs a `pattern` such as 'claude-*'")
    if not isinstance(backend, str) or not backend:
        raise ValueError(f"pattern {pattern!r}: needs the `backend` instance that serves it")
    upstream = entry.get("upstream_model", "{slug}")
    if not isinstance(upstream, str) or not upstream:
        raise ValueError(f"pattern {pattern!r}: upstream_model must be a string")
    template_name = entry.get("template")
    if template_name is not None and template_name not in templates:
        raise ValueError(f"pattern {pattern!r}: unknown template {template_name!r}")
    raw = {"modality": "chat", **templates.get(template_name or "", {})}
    raw.update({k: v for k, v in entry.items() if k not in PATTERN_KEYS})
    pass_through = _pass_through(pattern, entry.get("pass_through"))
    base = _model(pattern, {**raw, "slug": pattern}, pass_through)
    return ModelPattern(pattern=pattern, base=base, backend=backend, upstream_model=upstream)


def _pass_through(pattern: str, raw: Any) -> PassThrough | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ValueError(f"pattern {pattern!r}: pass_through must be a table")
    maximum, markup = raw.get("max_credits"), raw.get("markup", 1.0)
    if isinstance(maximum, bool) or not isinstance(maximum, int) or maximum < 1:
        raise ValueError(
            f"pattern {pattern!r}: pass_through.max_credits must be a whole number >= 1"
        )
    if isinstance(markup, bool) or not isinstance(markup, int | float) or not markup > 0:
        raise ValueError(f"pattern {pattern!r}: pass_through.markup must be a number > 0")
    return PassThrough(max_credits=maximum, markup=float(markup))


def load_catalogue(
    override_file: Path | None = None, patterns: Sequence[Mapping[str, Any]] = ()
) -> Catalogue:
    """The shipped catalogue, merged with the operator's file when one is given; ``patterns``
    (the settings' ``model_patterns``) come after the file's own ``[[patterns]]``."""
    shipped = tomllib.loads(resources.files("hypereal").joinpath("catalogue.toml").read_text())
    if override_file is not None:
        shipped = _merge(shipped, tomllib.loads(override_file.read_text()))
    if patterns:
        shipped = {**shipped, "patterns": [*shipped.get("patterns", []), *patterns]}
    return parse_catalogue(shipped)


# ------------------------------------------------------------------ parameter checks


def _invalid(field_name: str, reason: str) -> BadRequest:
    return BadRequest(f"Invalid value for '{field_name}': {reason}")


def _finite(value: int | float) -> bool:
    """False for NaN, +-Infinity and integers too large for a float (JSON ``1e400``, ...)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def check_text(value: str, field_name: str) -> str:
    """``value`` if it can be encoded as UTF-8. JSON's ``"\\ud800"`` parses into a Python
    string holding a lone surrogate, which no tokenizer, file or response can encode: refused
    here, at submission, rather than failing (a 500, or a charged job refunded) later."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise _invalid(
                field_name,
                f"is not valid Unicode text (a lone surrogate at character {exc.start})",
            ) from None
    return value


def _check(param: Param, value: Any, field_name: str) -> Any:
    kind = param.type
    if kind in ("string", "media"):
        if not isinstance(value, str):
            raise _invalid(field_name, "must be a string")
        check_text(value, field_name)
        if param.max_length is not None and len(value) > param.max_length:
            raise _invalid(field_name, f"must be at most {param.max_length} characters")
    elif kind == "media-list":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _invalid(field_name, "must be a list of URLs")
        for index, item in enumerate(value):
            check_text(item, f"{field_name}[{index}]")
    elif kind == "boolean":
        if not isinstance(value, bool):
            raise _invalid(field_name, "must be true or false")
    elif kind in ("integer", "number"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _invalid(
                field_name, f"must be a{'n integer' if kind == 'integer' else ' number'}"
            )
        if not _finite(value):
            raise _invalid(field_name, "must be a finite number")
        if kind == "integer" and isinstance(value, float):
            if not value.is_integer():
                raise _invalid(field_name, "must be an integer")
            value = int(value)
        if param.minimum is not None and value < param.minimum:
            raise _invalid(field_name, f"must be >= {param.minimum}")
        if param.maximum is not None and value > param.maximum:
            raise _invalid(field_name, f"must be <= {param.maximum}")
    if param.choices is not None and value not in param.choices:
        allowed = ", ".join(str(c) for c in param.choices)
        raise _invalid(field_name, f"must be one of: {allowed}")
    return value


def validate_params(spec: ModelSpec, values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Check ``values`` against the model's parameters and fill in defaults.

    Unknown fields are dropped (real clients send extras); ``None`` counts as absent.
    Raises BadRequest naming the field (with ``prefix``, e.g. ``input.duration``).
    """
    cleaned: dict[str, Any] = {}
    for param in spec.params:
        value = values.get(param.name)
        field_name = f"{prefix}{param.name}"
        if value is None or value == "":
            if param.required:
                raise BadRequest(f"Missing required field '{field_name}'")
            if param.default is not None:
                cleaned[param.name] = param.default
            continue
        cleaned[param.name] = _check(param, value, field_name)
    return cleaned
