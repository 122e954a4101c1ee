"""Calibration data handling and the streaming statistics hooks."""

from __future__ import annotations

import pytest
import torch

from rana_hf.calibration import CalibrationError, StatsCollector, calibration_chunks


class FakeTokenizer:
    bos_token_id, eos_token_id = 1, 2

    def __call__(self, text, add_special_tokens=True, **kwargs):
        ids = [3 + (ord(c) % 50) for c in text]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}


def test_chunks_from_text_start_with_bos():
    chunks = calibration_chunks(["abcdefgh" * 20, "xyz" * 30], FakeTokenizer(), seq_len=16)
    assert chunks.shape[1] == 16 and chunks.shape[0] == (160 + 1 + 90 + 1) // 15
    assert (chunks[:, 0] == 1).all()


def test_chunks_from_ids_and_limits():
    ids = torch.arange(1000).reshape(10, 100)
    assert calibration_chunks(ids, seq_len=50).shape == (20, 50)
    assert calibration_chunks(ids, seq_len=50, max_tokens=200).shape == (4, 50)
    assert calibration_chunks([[1, 2, 3]] * 10, seq_len=5).shape == (6, 5)


def test_bad_calibration_inputs():
    with pytest.raises(CalibrationError, match="tokenizer"):
        calibration_chunks(["some text"], None)
    with pytest.raises(CalibrationError, match="calibration must be"):
        calibration_chunks(42)
    with pytest.raises(CalibrationError, match="token ids"):
        calibration_chunks(torch.randn(2, 3))


def test_stats_collector_second_moment_and_bounded_sample():
    linear = torch.nn.Linear(8, 4)
    inputs = [torch.randn(3, 50, 8) for _ in range(4)]
    collector = StatsCollector({"lin": (linear, True)}, expected_tokens=600, sample_tokens=100, seed=0)
    with collector, torch.no_grad():
        for x in inputs:
            linear(x)
    assert not linear._forward_pre_hooks
    stats = collector.finish()["lin"]
    flat = torch.cat([x.reshape(-1, 8) for x in inputs]).double()
    torch.testing.assert_close(stats.covariance, flat.T @ flat, rtol=1e-5, atol=1e-4)
    assert stats.tokens == 600 and 50 <= stats.sample.shape[0] <= 100
