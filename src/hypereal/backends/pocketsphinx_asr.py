"""Speech to text with PocketSphinx, offline on the CPU (US English).

:class:`PocketsphinxTranscription` is the local ``audio`` backend for speech recognition
(``audio-asr``). The input file (``request.media["audio"]``: WAV, MP3, OGG/Opus/Vorbis, FLAC,
M4A/MP4, WebM/Matroska, AAC or AIFF) is decoded with PyAV and resampled to 16 kHz mono;
PocketSphinx's voice-activity endpointer cuts it into utterances, and each utterance is
decoded with the US English acoustic model, language model and CMU dictionary that the
``pocketsphinx==5.1.1`` wheel ships (nothing is downloaded at run time).

The output file is JSON (``application/json``), and the same object is the result's
``data``::

    {"text": "the quick brown fox", "language": "en-us", "duration_seconds": 2.9,
     "segments": [{"start": 0.0, "end": 2.88, "text": "the quick brown fox"}],
     "words": [{"word": "the", "start": 0.03, "end": 0.12}, ...]}

Times are seconds from the start of the file. Audio with no speech in it gives an empty
``text``; an input that is not audio, is empty, or is longer than ``max_duration_seconds``
is refused with a client error. PocketSphinx is a small, old-style recogniser: it is fast
and private, but far less accurate than modern neural models on real-world recordings.

Options:

``max_duration_seconds``
    Longest input accepted (default 3600).
``vad_mode``
    Aggressiveness of the voice-activity detector, 0 (keeps most) to 3 (default 0).
"""

from __future__ import annotations

import functools
import importlib
import io
import json
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
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

__all__ = [
    "POCKETSPHINX_INSTALL",
    "SAMPLE_RATE",
    "PocketsphinxTranscription",
    "decode_to_pcm16k",
    "sniff_audio_format",
]

POCKETSPHINX_INSTALL = "pip install pocketsphinx==5.1.1 av==18.1.0 numpy==1.26.4"

SAMPLE_RATE = 16_000
DEFAULT_MAX_DURATION = 3600.0
LANGUAGE = "en-us"
_ENGLISH = {"", "en", "en-us", "en_us", "english"}

# The audio is fed to the recogniser in slices of this many seconds per thread hop, so
# progress is reported and a cancelled job stops within a slice.
_SLICE_SECONDS = 15

_SUPPORTED = "WAV, MP3, OGG (Vorbis/Opus), FLAC, M4A/MP4, WebM/Matroska, AAC (ADTS) or AIFF"

# Recognisers are slow to create (~1 s: the models load) and not thread-safe: a pool of
# idle ones is shared by every instance; a busy one is never handed out twice.
_IDLE_DECODERS: list[Any] = []
_DECODERS_LOCK = threading.Lock()

# "word(2)" is the second pronunciation of "word" in the dictionary.
_ALTERNATE = re.compile(r"\(\d+\)$")


def _import(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except Exception as exc:  # ImportError, or a native library failing to load
        raise BackendUnavailable(
            f"PocketsphinxTranscription needs {name} ({type(exc).__name__}: {exc}). "
            f"Install it with: {POCKETSPHINX_INSTALL}"
        ) from exc


def sniff_audio_format(data: bytes) -> str | None:
    """The FFmpeg demuxer for ``data`` when it is a supported audio container, else None.

    The demuxer is chosen here, never probed by FFmpeg: that keeps playlist and reference
    formats (HLS, concat, ...) that would open other files or URLs out of reach.
    """
    head = data[:16]
    if len(head) < 4:
        return None
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    if head[4:8] == b"ftyp":
        return "mov"
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "aiff"
    if head[:3] == b"ID3":
        return "mp3"
    if head[0] == 0xFF and head[1] & 0xF6 == 0xF0:  # ADTS: sync word, layer 00
        return "aac"
    if head[0] == 0xFF and head[1] & 0xE0 == 0xE0 and head[1] & 0x06:  # MPEG audio frame
        return "mp3"
    return None


def decode_to_pcm16k(data: bytes, max_seconds: float) -> bytes:
    """Decode an audio file to 16 kHz mono signed 16-bit little-endian PCM.

    Raises BackendError(client_error=True) when it is not a supported audio file, holds no
    audio, or is longer than ``max_seconds``.
    """
    av = _import("av")
    np = _import("numpy")
    fmt = sniff_audio_format(data)
    if fmt is None:
        raise BackendError(
            f"audio is not a recognised audio file; send {_SUPPORTED}", client_error=True
        )
    max_samples = int(max_seconds * SAMPLE_RATE)
    chunks: list[Any] = []
    total = 0
    try:
        with av.open(io.BytesIO(data), mode="r", format=fmt) as container:
            if not container.streams.audio:
                raise BackendError("the file has no audio track", client_error=True)
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)

            def take(frames: list[Any]) -> None:
                nonlocal total
                for frame in frames:
                    samples = frame.to_ndarray().reshape(-1)
                    total += len(samples)
                    if total > max_samples:
                        raise BackendError(
                            f"audio is longer than this server's limit of {max_seconds:g} s",
                            client_error=True,
                        )
                    chunks.append(samples)

            for frame in container.decode(stream):
                take(resampler.resample(frame))
            take(resampler.resample(None))
    except BackendError:
        raise
    except (av.error.FFmpegError, ValueError, EOFError, OSError, IndexError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise BackendError(
            f"could not decode the audio ({fmt}): {reason}", client_error=True
        ) from exc
    if total == 0:
        raise BackendError("audio is empty: it decodes to no samples", client_error=True)
    pcm: bytes = np.concatenate(chunks).astype("<i2").tobytes()
    return pcm


def _acquire_decoder() -> Any:
    with _DECODERS_LOCK:
        if _IDLE_DECODERS:
            return _IDLE_DECODERS.pop()
    pocketsphinx = _import("pocketsphinx")
    # The default acoustic model, language model and dictionary shipped in the wheel.
    return pocketsphinx.Decoder(samprate=SAMPLE_RATE, loglevel="FATAL")


def _release_decoder(decoder: Any) -> None:
    # The feature extraction adapts to the audio a decoder hears (its noise estimate and
    # cepstral mean): made anew (microseconds, no model reloaded), so that a transcript does
    # not depend on what the pooled decoder decoded before.
    decoder.reinit_feat()
    with _DECODERS_LOCK:
        _IDLE_DECODERS.append(decoder)


@dataclass
class _Recognition:
    """Endpointer + decoder state while one file is fed through, slice by slice."""

    decoder: Any
    endpointer: Any
    frame_rate: int
    segments: list[dict[str, Any]] = field(default_factory=list)
    words: list[dict[str, Any]] = field(default_factory=list)

    def feed(self, pcm: bytes, *, last: bool) -> None:
        """Feed whole endpointer frames of ``pcm``; with ``last`` the final (short) frame
        ends the stream. ``pcm`` must be a multiple of the frame size unless ``last``."""
        size = int(self.endpointer.frame_bytes)
        for start in range(0, len(pcm), size):
            frame = pcm[start : start + size]
            final = last and start + size >= len(pcm)
            was_in_speech = bool(self.endpointer.in_speech)
            speech = self.endpointer.end_stream(frame) if final else self.endpointer.process(frame)
            if speech is None:
                continue
            if not was_in_speech:
                self.decoder.start_utt()
            self.decoder.process_raw(speech, False, False)
            if not self.endpointer.in_speech:
                self._end_utterance(float(self.endpointer.speech_end))

    def finish(self, duration: float) -> None:
        """Close an utterance still open when the audio ended exactly on a frame."""
        if self.endpointer.in_speech:
            self._end_utterance(duration)

    def _end_utterance(self, end: float) -> None:
        self.decoder.end_utt()
        start = float(self.endpointer.speech_start)
        words: list[dict[str, Any]] = []
        for seg in self.decoder.seg():
            word = _ALTERNATE.sub("", str(seg.word))
            if not word or word[0] in "<[+":  # <s>, </s>, <sil>, [NOISE], ++FILLER++
                continue
            word_start = min(start + seg.start_frame / self.frame_rate, end)
            word_end = min(start + (seg.end_frame + 1) / self.frame_rate, end)
            words.append({"word": word, "start": round(word_start, 3), "end": round(word_end, 3)})
        if words:
            text = " ".join(w["word"] for w in words)
            self.segments.append({"start": round(start, 3), "end": round(end, 3), "text": text})
            self.words.extend(words)


class PocketsphinxTranscription:
    """US English speech recognition with the model shipped in the pocketsphinx wheel."""

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        """Check that pocketsphinx, its model, PyAV and numpy are present; raises
        BackendUnavailable otherwise."""
        options = options or {}
        pocketsphinx = _import("pocketsphinx")
        _import("av")
        _import("numpy")
        model = pocketsphinx.get_model_path("en-us")
        if not Path(str(model)).is_dir():
            raise BackendUnavailable(
                f"the PocketSphinx US English model is missing ({model}); the "
                f"pocketsphinx==5.1.1 wheel ships it. Install it with: {POCKETSPHINX_INSTALL}"
            )
        max_duration = options.get("max_duration_seconds", DEFAULT_MAX_DURATION)
        if isinstance(max_duration, bool) or not isinstance(max_duration, int | float):
            raise BackendUnavailable("option 'max_duration_seconds' must be a number")
        if max_duration <= 0:
            raise BackendUnavailable("option 'max_duration_seconds' must be positive")
        self.max_duration = float(max_duration)
        vad_mode = options.get("vad_mode", 0)
        if isinstance(vad_mode, bool) or vad_mode not in (0, 1, 2, 3):
            raise BackendUnavailable(f"option 'vad_mode' must be 0, 1, 2 or 3, got {vad_mode!r}")
        self.vad_mode = int(vad_mode)
        self._pocketsphinx = pocketsphinx

    @staticmethod
    def _language(value: Any) -> str:
        if value is None or (isinstance(value, str) and value.strip().lower() in _ENGLISH):
            return LANGUAGE
        raise BackendError(
            f"language {value!r} is not available: this server's speech recogniser "
            "(PocketSphinx) has only its US English model (language 'en' or 'en-us')",
            client_error=True,
        )

    async def generate_audio(self, request: JobRequest, progress: ProgressCallback) -> JobResult:
        language = self._language(request.input.get("language"))
        blob = request.media.get("audio")
        if blob is None or not blob.data:
            raise BackendError("audio is required: the recording to transcribe", client_error=True)

        await progress(0.02, "decoding audio")
        pcm = await anyio.to_thread.run_sync(decode_to_pcm16k, blob.data, self.max_duration)
        duration = len(pcm) / 2 / SAMPLE_RATE

        decoder = await anyio.to_thread.run_sync(_acquire_decoder)
        ok = False
        try:
            endpointer = self._pocketsphinx.Endpointer(
                vad_mode=self.vad_mode, sample_rate=SAMPLE_RATE
            )
            state = _Recognition(decoder, endpointer, int(decoder.config["frate"]))
            frame_bytes = int(endpointer.frame_bytes)
            step = max(1, _SLICE_SECONDS * SAMPLE_RATE * 2 // frame_bytes) * frame_bytes
            for start in range(0, len(pcm), step):
                await progress(
                    0.1 + 0.85 * start / len(pcm),
                    f"recognising {start / 2 / SAMPLE_RATE:.0f} s of {duration:.0f} s",
                )
                piece = pcm[start : start + step]
                last = start + step >= len(pcm)
                await anyio.to_thread.run_sync(functools.partial(state.feed, piece, last=last))
            await anyio.to_thread.run_sync(state.finish, duration)
            ok = True
        finally:
            # A decoder interrupted mid-utterance is dropped rather than reused.
            if ok:
                _release_decoder(decoder)

        result: dict[str, Any] = {
            "text": " ".join(s["text"] for s in state.segments),
            "language": language,
            "duration_seconds": round(duration, 3),
            "segments": state.segments,
            "words": state.words,
        }
        body = json.dumps(result, ensure_ascii=False).encode()
        return JobResult(output=MediaBlob(body, "application/json"), data=result)
