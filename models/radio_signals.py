"""Synthetic modulated radio frames for the 1-D CNN example (RadioML-like).

Each frame is 128 complex baseband samples given as float32 (2, 128) I/Q
rows: a random message or symbol stream, pulse shaped, with a random carrier
frequency offset, carrier phase and timing offset, AWGN at a drawn SNR, then
normalised to unit average power. Everything is numpy and deterministic for a
given seed, so the committed dataset files can be regenerated bit for bit.
"""

from __future__ import annotations

import numpy as np

FRAME_LEN = 128
SAMPLES_PER_SYMBOL = 8
# Largest carrier frequency offset, in cycles per sample: up to a quarter turn
# of drift across a frame, so the constellation is visibly rotating but a
# small receptive field still sees it as a constellation.
MAX_CFO = 0.002
# Symbols generated beyond the frame on each side so that the pulse-shaping
# filter has settled before the window that is kept.
_GUARD_SYMBOLS = 8

CLASSES = ("BPSK", "QPSK", "8PSK", "QAM16", "QAM64", "PAM4", "GFSK", "CPFSK", "AM-DSB", "WBFM")


def _square_qam(order: int) -> np.ndarray:
    side = int(round(np.sqrt(order)))
    levels = np.arange(side) * 2.0 - (side - 1)
    points = (levels[:, None] + 1j * levels[None, :]).ravel()
    return points / np.sqrt(np.mean(np.abs(points) ** 2))


def _psk(order: int) -> np.ndarray:
    # The pi/order offset keeps QPSK on the diagonals, the usual convention.
    offset = np.pi / order if order == 4 else 0.0
    return np.exp(1j * (2 * np.pi * np.arange(order) / order + offset))


def _pam(order: int) -> np.ndarray:
    levels = np.arange(order) * 2.0 - (order - 1)
    return (levels / np.sqrt(np.mean(levels**2))).astype(complex)


_CONSTELLATIONS = {
    "BPSK": _psk(2),
    "QPSK": _psk(4),
    "8PSK": _psk(8),
    "QAM16": _square_qam(16),
    "QAM64": _square_qam(64),
    "PAM4": _pam(4),
}


def raised_cosine(t: np.ndarray, rolloff: float) -> np.ndarray:
    """Raised-cosine pulse h(t) = sinc(t) cos(pi b t) / (1 - (2 b t)^2), t in symbols.

    At the removable singularity |t| = 1/(2b) the limit (pi/4) sinc(1/(2b)) is used.
    """
    t = np.asarray(t, dtype=float)
    denom = 1.0 - (2.0 * rolloff * t) ** 2
    singular = np.abs(denom) < 1e-8
    safe = np.where(singular, 1.0, denom)
    h = np.sinc(t) * np.cos(np.pi * rolloff * t) / safe
    limit = np.pi / 4 * np.sinc(1.0 / (2.0 * rolloff))
    return np.where(singular, limit, h)


def _shaped_symbols(rng: np.random.Generator, points: np.ndarray, n_frames: int) -> np.ndarray:
    """Linear modulation: random symbols through a raised-cosine filter with a timing offset."""
    sps = SAMPLES_PER_SYMBOL
    n_sym = FRAME_LEN // sps + 2 * _GUARD_SYMBOLS
    symbols = points[rng.integers(0, len(points), (n_frames, n_sym))]
    rolloff = rng.uniform(0.25, 0.5, size=(n_frames, 1, 1))
    tau = rng.uniform(0.0, 1.0, size=(n_frames, 1, 1))  # timing offset, a fraction of a symbol
    # Sample n of the kept window sits at time n/sps + tau symbols; symbol k
    # is centred at time k - guard, so its contribution is h(time - k + guard).
    n = np.arange(FRAME_LEN)[None, :, None] / sps
    k = np.arange(n_sym)[None, None, :] - _GUARD_SYMBOLS
    pulse = raised_cosine(n + tau - k, rolloff)
    return np.einsum("fnk,fk->fn", pulse, symbols)


def _gaussian_taps(bt: float) -> np.ndarray:
    """Gaussian frequency-pulse filter of bandwidth-time product `bt`, unit DC gain."""
    sps = SAMPLES_PER_SYMBOL
    t = np.arange(-2 * sps, 2 * sps + 1) / sps
    sigma = np.sqrt(np.log(2)) / (2 * np.pi * bt)
    taps = np.exp(-(t**2) / (2 * sigma**2))
    return taps / taps.sum()


def _fsk(rng: np.random.Generator, n_frames: int, *, gaussian: bool) -> np.ndarray:
    """Binary continuous-phase FSK; GFSK smooths the frequency pulse with a Gaussian."""
    sps = SAMPLES_PER_SYMBOL
    n_sym = FRAME_LEN // sps + 2 * _GUARD_SYMBOLS
    bits = rng.integers(0, 2, (n_frames, n_sym)) * 2.0 - 1.0
    freq = np.repeat(bits, sps, axis=1)
    if gaussian:
        bt = rng.uniform(0.3, 0.5, size=n_frames)
        freq = np.stack([np.convolve(f, _gaussian_taps(b), mode="same") for f, b in zip(freq, bt)])
        h = rng.uniform(0.3, 0.5, size=(n_frames, 1))
    else:
        h = rng.uniform(0.5, 1.0, size=(n_frames, 1))
    # Modulation index h: the phase moves by pi*h per symbol.
    phase = np.pi * h * np.cumsum(freq, axis=1) / sps
    start = _GUARD_SYMBOLS * sps + rng.integers(0, sps, size=(n_frames, 1))
    window = np.take_along_axis(phase, start + np.arange(FRAME_LEN)[None, :], axis=1)
    return np.exp(1j * window)


def _audio_like(rng: np.random.Generator, n_frames: int) -> np.ndarray:
    """Band-limited random messages in [-1, 1]: white noise low-passed in frequency."""
    spectrum = np.fft.rfft(rng.standard_normal((n_frames, FRAME_LEN)), axis=1)
    freqs = np.fft.rfftfreq(FRAME_LEN)
    cutoff = rng.uniform(0.01, 0.06, size=(n_frames, 1))
    message = np.fft.irfft(spectrum * (freqs[None, :] <= cutoff), n=FRAME_LEN, axis=1)
    message -= message.mean(axis=1, keepdims=True)
    peak = np.abs(message).max(axis=1, keepdims=True)
    return message / np.where(peak > 0, peak, 1.0)


def _am_dsb(rng: np.random.Generator, n_frames: int) -> np.ndarray:
    depth = rng.uniform(0.3, 0.9, size=(n_frames, 1))
    return (1.0 + depth * _audio_like(rng, n_frames)).astype(complex)


def _wbfm(rng: np.random.Generator, n_frames: int) -> np.ndarray:
    # Peak deviation between 0.05 and 0.15 cycles per sample: wide band
    # relative to the message bandwidth, as broadcast FM is.
    deviation = rng.uniform(0.05, 0.15, size=(n_frames, 1))
    phase = 2 * np.pi * np.cumsum(deviation * _audio_like(rng, n_frames), axis=1)
    return np.exp(1j * phase)


def modulate(name: str, n_frames: int, rng: np.random.Generator) -> np.ndarray:
    """Clean complex baseband frames (n_frames, FRAME_LEN) of one modulation."""
    if name in _CONSTELLATIONS:
        return _shaped_symbols(rng, _CONSTELLATIONS[name], n_frames)
    if name == "GFSK":
        return _fsk(rng, n_frames, gaussian=True)
    if name == "CPFSK":
        return _fsk(rng, n_frames, gaussian=False)
    if name == "AM-DSB":
        return _am_dsb(rng, n_frames)
    if name == "WBFM":
        return _wbfm(rng, n_frames)
    raise ValueError(f"unknown modulation {name!r}; expected one of {CLASSES}")


def _channel(rng: np.random.Generator, clean: np.ndarray, snr_db: np.ndarray) -> np.ndarray:
    """Carrier offset and phase, AWGN at `snr_db`, then unit average power per frame."""
    n_frames = clean.shape[0]
    signal = clean / np.sqrt(np.mean(np.abs(clean) ** 2, axis=1, keepdims=True))
    cfo = rng.uniform(-MAX_CFO, MAX_CFO, size=(n_frames, 1))
    phase0 = rng.uniform(0.0, 2 * np.pi, size=(n_frames, 1))
    signal = signal * np.exp(1j * (2 * np.pi * cfo * np.arange(FRAME_LEN)[None, :] + phase0))
    noise_power = 10.0 ** (-snr_db[:, None] / 10.0)
    noise = (rng.standard_normal(signal.shape) + 1j * rng.standard_normal(signal.shape)) * np.sqrt(noise_power / 2)
    received = signal + noise
    return received / np.sqrt(np.mean(np.abs(received) ** 2, axis=1, keepdims=True))


def make_dataset(
    n_per_class: int,
    *,
    snr_db: tuple[float, float] = (-6.0, 18.0),
    seed: int = 0,
    classes: tuple[str, ...] = CLASSES,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generate a shuffled, class-balanced set of frames.

    Returns `x` float32 (N, 2, 128) with I and Q rows, `y` int64 class indices
    into `classes`, and `snr` float32 dB, drawn uniformly from `snr_db` and
    rounded to whole dB so that accuracy can be reported per SNR.
    """
    lo, hi = snr_db
    if lo > hi:
        raise ValueError(f"snr_db range {snr_db} is empty")
    rng = np.random.default_rng(seed)
    xs, ys, snrs = [], [], []
    for label, name in enumerate(classes):
        clean = modulate(name, n_per_class, rng)
        snr = np.round(rng.uniform(lo, hi, size=n_per_class))
        frames = _channel(rng, clean, snr)
        xs.append(np.stack([frames.real, frames.imag], axis=1))
        ys.append(np.full(n_per_class, label))
        snrs.append(snr)
    order = rng.permutation(n_per_class * len(classes))
    x = np.concatenate(xs)[order].astype(np.float32)
    y = np.concatenate(ys)[order].astype(np.int64)
    snr = np.concatenate(snrs)[order].astype(np.float32)
    return x, y, snr
