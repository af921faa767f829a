"""Request body schemas for the OpenAPI document (``api/openapi.py``), generated from the
catalogue: every model's parameters become a ``{slug}.input`` schema (types, bounds, choices,
defaults, required), and each generation route's body is one branch per model of its
modality (``model`` names the branch). A route's default model may be left out.

The schemas say what the server really checks: unknown fields are allowed (they are
ignored), and a field is required only where the server refuses a request without it.
"""

from __future__ import annotations

from typing import Any

from hypereal.domain.catalogue import Catalogue, ModelSpec, Param

# A content part: chat reads its ``text`` (other kinds are refused); Anthropic's
# ``/messages`` also wants ``"type": "text"``.
TEXT_PART = {
    "type": "object",
    "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}},
    "required": ["text"],
}
TEXT_BLOCK = {
    "type": "object",
    "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}},
    "required": ["type", "text"],
}
MEDIA_DESCRIPTION = "An http(s) URL or a data: URI of the file"


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` or null: the server takes a null field as one not sent."""
    kind = schema.get("type")
    if isinstance(kind, str):
        return {**schema, "type": [kind, "null"]}
    return {"anyOf": [schema, {"type": "null"}]}


def param_schema(param: Param) -> dict[str, Any]:
    """One catalogue parameter as a JSON schema (null, as not sent, unless required)."""
    kinds: dict[str, dict[str, Any]] = {
        "string": {"type": "string"},
        "integer": {"type": "integer"},
        "number": {"type": "number"},
        "boolean": {"type": "boolean"},
        "media": {"type": "string", "minLength": 1, "description": MEDIA_DESCRIPTION},
        "media-list": {
            "anyOf": [
                {"type": "array", "items": {"type": "string", "minLength": 1}},
                {"type": "string", "minLength": 1},
            ],
            "description": "URLs or data: URIs of the files (one may be sent as a string)",
        },
    }
    schema = dict(kinds[param.type])
    if param.description:
        schema["description"] = param.description
    if param.minimum is not None:
        schema["minimum"] = param.minimum
    if param.maximum is not None:
        schema["maximum"] = param.maximum
    if param.max_length is not None:
        schema["maxLength"] = param.max_length
    if param.choices is not None:
        schema["enum"] = list(param.choices)
    if param.default is not None:
        schema["default"] = param.default
    if param.required and param.type == "string":
        schema["minLength"] = max(1, schema.get("minLength", 1))
    if param.choices is not None and not param.required:
        schema["enum"] = [*schema["enum"], None]
    return schema if param.required else nullable(schema)


def input_schema(spec: ModelSpec) -> dict[str, Any]:
    """The ``input`` a model takes."""
    schema: dict[str, Any] = {
        "type": "object",
        "title": f"{spec.slug} input",
        "description": spec.description or spec.name,
        "properties": {param.name: param_schema(param) for param in spec.params},
    }
    required = [param.name for param in spec.params if param.required]
    if required:
        schema["required"] = required
    return schema


def input_name(spec: ModelSpec) -> str:
    return f"{spec.slug}.input"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json_body(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "required": True,
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }


def _one_of(branches: list[dict[str, Any]]) -> dict[str, Any]:
    return branches[0] if len(branches) == 1 else {"oneOf": branches}


def _job_branch(spec: ModelSpec, default: str | None) -> dict[str, Any]:
    branch: dict[str, Any] = {
        "type": "object",
        "title": spec.slug,
        "properties": {
            "model": {"type": "string", "enum": [spec.slug]},
            "input": _ref(input_name(spec)),
            "webhook_url": {
                "type": ["string", "null"],
                "maxLength": 2048,
                "description": "An http(s) URL the finished job is POSTed to (Standard "
                "Webhooks); empty or null: none",
            },
        },
    }
    required = [] if spec.slug == default else ["model"]
    if any(param.required for param in spec.params):
        required.append("input")
    else:
        branch["properties"]["input"] = nullable(branch["properties"]["input"])
    if spec.slug == default:
        branch["properties"]["model"] = nullable(branch["properties"]["model"])
    if required:
        branch["required"] = required
    return branch


def _image_branch(spec: ModelSpec, default: str | None) -> dict[str, Any]:
    # The default model's branch may leave ``model`` out (not null: a null model is a 400).
    properties: dict[str, Any] = {"model": {"type": "string", "enum": [spec.slug]}}
    required = [] if spec.slug == default else ["model"]
    for param in spec.params:
        properties[param.name] = param_schema(param)
        if param.required:
            required.append(param.name)
    branch: dict[str, Any] = {"type": "object", "title": spec.slug, "properties": properties}
    images = spec.param("images")
    if images is not None:  # ``image`` (one) and ``images`` are merged: either may be sent
        properties["image"] = nullable({"type": "string", "minLength": 1})
        properties["image"]["description"] = "One source image (or use images)"
        if images.required:
            required.remove("images")
            properties["images"] = nullable(param_schema(images))
            branch["anyOf"] = [{"required": ["images"]}, {"required": ["image"]}]
    if required:
        branch["required"] = required
    return branch


def _messages(roles: list[str], content: dict[str, Any]) -> dict[str, Any]:
    """A ``messages`` array: at least one ``{role, content}``."""
    item = {
        "type": "object",
        "properties": {"role": {"type": "string", "enum": roles}, "content": content},
        "required": ["role", "content"],
    }
    return {"type": "array", "minItems": 1, "items": item}


def _chat_schemas(catalogue: Catalogue) -> dict[str, dict[str, Any]]:
    slugs = [spec.slug for spec in catalogue.of_modality("chat")]
    content = {"anyOf": [{"type": "string"}, {"type": "array", "items": TEXT_PART}]}
    blocks = {"anyOf": [{"type": "string"}, {"type": "array", "items": TEXT_BLOCK}]}
    model = {"type": "string", "enum": slugs, "description": "A chat model's slug"}
    chat_model = nullable(model)
    if catalogue.defaults.get("chat"):
        chat_model["default"] = catalogue.defaults["chat"]
    chat: dict[str, Any] = {
        "type": "object",
        "properties": {
            "model": chat_model,
            "messages": _messages(["system", "user", "assistant"], content),
            "temperature": {"type": "number", "minimum": 0, "maximum": 2, "default": 0.8},
            "max_tokens": {"type": "integer", "minimum": 1, "maximum": 32768, "default": 4096},
            "stream": {"type": ["boolean", "null"], "description": "Server-sent events"},
        },
        "required": ["messages"],
        "example": {
            "model": catalogue.defaults.get("chat", slugs[0] if slugs else "model"),
            "messages": [{"role": "user", "content": "Hello!"}],
            "max_tokens": 64,
            "stream": False,
        },
    }
    anthropic: dict[str, Any] = {
        "type": "object",
        "properties": {
            "model": model,
            "max_tokens": {"type": "integer", "minimum": 1},
            "messages": _messages(["user", "assistant"], blocks),
            "system": nullable(blocks),
            "temperature": {"type": "number", "minimum": 0, "maximum": 1},
            "stop_sequences": {
                "type": ["array", "null"],
                "maxItems": 16,
                "items": {"type": "string", "minLength": 1},
            },
            "stream": {"type": "boolean"},
        },
        "required": ["model", "max_tokens", "messages"],
    }
    return {"ChatRequest": chat, "MessagesRequest": anthropic}


def _openai_bodies() -> dict[tuple[str, str], dict[str, Any]]:
    """The OpenAI-standard media routes (``routes/openai_media.py``)."""
    text = {"type": "string"}
    binary = {"type": "string", "format": "binary"}
    image_fields = {
        "prompt": {"type": "string", "minLength": 1},
        "model": {"type": "string", "description": "An image model's slug or OpenAI name"},
        "n": {"type": "integer", "minimum": 1, "maximum": 10, "default": 1},
        "size": {"type": "string", "example": "1024x1024"},
        "response_format": {"type": "string", "enum": ["url", "b64_json"], "default": "url"},
    }
    generations: dict[str, Any] = {
        "type": "object",
        "properties": image_fields,
        "required": ["prompt"],
    }
    edits = {
        "type": "object",
        "properties": {"image": {"type": "array", "items": binary}, **image_fields},
        "required": ["image", "prompt"],
    }
    speech: dict[str, Any] = {
        "type": "object",
        "properties": {
            "model": {"type": "string", "example": "tts-1"},
            "input": {"type": "string", "minLength": 1},
            "voice": text,
            "response_format": {"type": "string", "enum": ["mp3", "wav"]},
            "speed": {"type": "number"},
        },
        "required": ["input"],
    }
    transcription = {
        "type": "object",
        "properties": {
            "file": binary,
            "model": {"type": "string", "example": "whisper-1"},
            "response_format": {
                "type": "string",
                "enum": ["json", "text", "verbose_json", "srt", "vtt"],
            },
            "language": text,
        },
        "required": ["file"],
    }

    def multipart(schema: dict[str, Any], description: str) -> dict[str, Any]:
        return {
            "required": True,
            "description": description,
            "content": {"multipart/form-data": {"schema": schema}},
        }

    for body in (generations, speech):  # JSON: a null field is one not sent
        fields: dict[str, Any] = body["properties"]
        for name, field in list(fields.items()):
            if name not in body["required"]:
                fields[name] = nullable(field)
    return {
        ("post", "/images/generations"): _json_body(generations, "OpenAI images.generate"),
        ("post", "/images/edits"): multipart(edits, "OpenAI images.edit"),
        ("post", "/audio/speech"): _json_body(speech, "OpenAI audio.speech"),
        ("post", "/audio/transcriptions"): multipart(transcription, "OpenAI transcriptions"),
    }


def request_bodies(
    catalogue: Catalogue, schemas: dict[str, Any]
) -> dict[tuple[str, str], dict[str, Any]]:
    """(method, path without prefix) -> the operation's ``requestBody``; adds the model
    input and chat schemas to ``schemas`` (the document's components)."""
    for spec in catalogue.models.values():
        schemas[input_name(spec)] = input_schema(spec)
    schemas.update(_chat_schemas(catalogue))
    bodies = _openai_bodies()
    chat = _json_body(_ref("ChatRequest"), "A chat turn")
    for path in ("/chat", "/spicy-chat", "/chat/completions"):
        bodies[("post", path)] = chat
    bodies[("post", "/messages")] = _json_body(_ref("MessagesRequest"), "Anthropic Messages")
    for path, modality in (
        ("/videos/generate", "video"),
        ("/audio/generate", "audio"),
        ("/3d/generate", "3d"),
    ):
        default = catalogue.defaults.get(modality)
        branches = [_job_branch(spec, default) for spec in catalogue.of_modality(modality)]
        if branches:
            bodies[("post", path)] = _json_body(_one_of(branches), f"A {modality} job")
    for path, modalities in (
        ("/images/generate", ("image", "image-edit")),
        ("/images/edit", ("image-edit",)),
    ):
        default = catalogue.defaults.get(modalities[0])
        specs = [spec for modality in modalities for spec in catalogue.of_modality(modality)]
        branches = [_image_branch(spec, default) for spec in specs]
        if branches:
            bodies[("post", path)] = _json_body(_one_of(branches), "An image request")
    return bodies
