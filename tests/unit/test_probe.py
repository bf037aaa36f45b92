"""The probe's two read-outs on features whose answer is known."""

from __future__ import annotations

import torch

from mixmae_scale.finetune.probe import Features, probe_features


def clusters(separation: float, seed: int, per_class: int = 40, classes: int = 4, dim: int = 16) -> Features:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=generator) * separation
    labels = torch.arange(classes).repeat_interleave(per_class)
    train = centres[labels] + torch.randn(len(labels), dim, generator=generator)
    val = centres[labels] + torch.randn(len(labels), dim, generator=generator)
    return Features(train, labels, val, labels)


def test_separable_features_are_read_perfectly_and_noise_at_chance():
    separated = probe_features(clusters(separation=6.0, seed=0), num_classes=4)
    assert separated.top1 == 100.0 and separated.knn_top1 == 100.0 and separated.train_top1 == 100.0
    noise = probe_features(clusters(separation=0.0, seed=1), num_classes=4)
    assert noise.top1 < 45 and noise.knn_top1 < 45  # chance is 25%


def test_the_linear_probe_is_deterministic():
    features = clusters(separation=1.0, seed=2)
    assert probe_features(features, 4) == probe_features(features, 4)


def test_the_margin_report_and_its_line_compare_the_pretrained_top1_with_the_random_encoders_mean():
    from mixmae_scale.cli.encoder_commands import probe_line
    from mixmae_scale.finetune.probe import ProbeResult, margin_report

    pretrained = ProbeResult(top1=70.0, knn_top1=60.0, train_top1=90.0, train_samples=100, val_samples=20)
    baselines = [ProbeResult(t, k, 50.0, 100, 20) for t, k in ((38.0, 30.0), (40.0, 30.0), (42.0, 36.0))]
    report = margin_report(pretrained, baselines)
    assert report["linear"]["margin"] == 30.0 and report["linear"]["margin_in_spread"] == 15.0
    assert report["knn"]["margin"] == 28.0 and report["knn"]["random_init"]["max"] == 36.0
    assert probe_line(report["linear"]) == ("70.0% pretrained vs 40.0 +- 2.0% random encoders (+30.0 points, "
                                            "15.0x their spread)")
