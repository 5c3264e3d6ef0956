"""Synthetic pulsed tones and their log-mel spectrograms (numpy only).

The log-mel front end is hand-written (~20 lines) rather than taken from librosa/torchaudio so that
making the zoo's data needs numpy alone; it follows the usual recipe: Hann-windowed STFT power ->
triangular HTK-mel filterbank -> log10.
"""

from __future__ import annotations

import numpy as np

SAMPLE_RATE = 8000
N_FFT = 256
HOP = 64
N_MELS = 32
N_FRAMES = 64
# No centre padding: exactly N_FRAMES frames fit.
N_SAMPLES = N_FFT + (N_FRAMES - 1) * HOP

# Pulses per clip: the rhythm a classifier can hear.
PULSE_COUNTS = (3, 4, 5)


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + hz / 700.0)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def mel_filterbank(n_mels: int = N_MELS, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Triangular filters [n_mels, n_fft // 2 + 1], evenly spaced on the HTK mel scale."""
    bins_hz = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges_hz = _mel_to_hz(np.linspace(_hz_to_mel(np.array(0.0)), _hz_to_mel(np.array(sample_rate / 2)), n_mels + 2))
    lower, centre, upper = edges_hz[:-2, None], edges_hz[1:-1, None], edges_hz[2:, None]
    rising = (bins_hz[None] - lower) / (centre - lower)
    falling = (upper - bins_hz[None]) / (upper - centre)
    return np.clip(np.minimum(rising, falling), 0.0, None).astype(np.float32)


_FILTERBANK = mel_filterbank()
_WINDOW = np.hanning(N_FFT + 1)[:-1].astype(np.float32)  # periodic Hann


def log_mel(wave: np.ndarray) -> np.ndarray:
    """float32 [N_MELS, N_FRAMES] log-mel of a mono ``wave`` of N_SAMPLES samples, roughly in [-1, 2]."""
    frames = np.lib.stride_tricks.sliding_window_view(wave, N_FFT)[::HOP][:N_FRAMES]
    power = np.abs(np.fft.rfft(frames * _WINDOW, axis=-1)) ** 2
    mel = power @ _FILTERBANK.T
    # Offset and scale keep values O(1): friendlier to 8-bit activation ranges than raw log powers.
    return ((np.log10(mel + 1e-3) + 1.0) / 2.0).T.astype(np.float32)


def pulsed_tone(rng: np.random.Generator, pulses: int, f0: float) -> np.ndarray:
    """A harmonic tone near ``f0`` Hz, gliding slightly, switched on and off ``pulses`` times, plus noise."""
    t = np.arange(N_SAMPLES) / SAMPLE_RATE
    duration = N_SAMPLES / SAMPLE_RATE
    glide = rng.uniform(-0.15, 0.15)
    freq = f0 * (1.0 + glide * (t / duration - 0.5))
    phase = 2.0 * np.pi * np.cumsum(freq) / SAMPLE_RATE
    tone = np.sin(phase) + 0.4 * np.sin(2 * phase) + 0.2 * np.sin(3 * phase)
    cycle = (t / duration * pulses + rng.uniform(0.0, 1.0)) % 1.0
    duty = rng.uniform(0.4, 0.6)
    envelope = (cycle < duty).astype(np.float64)
    amplitude = rng.uniform(0.2, 0.8)
    noise = rng.normal(0.0, rng.uniform(0.05, 0.3), size=N_SAMPLES)
    return (amplitude * envelope * tone + noise).astype(np.float32)
