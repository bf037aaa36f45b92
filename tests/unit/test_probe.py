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


def test_the_knn_vote_reads_its_own_features_and_the_linear_probe_the_grid():
    separated, noise = clusters(separation=6.0, seed=3), clusters(separation=0.0, seed=4)
    knn_reads_the_clusters = Features(noise.train_x, noise.train_y, noise.val_x, noise.val_y,
                                      separated.train_x, separated.val_x)
    result = probe_features(knn_reads_the_clusters, num_classes=4)
    assert result.knn_top1 == 100.0 and result.top1 < 45


def test_the_readouts_are_a_2x2_grid_of_every_stage_but_the_last_its_3x3_grid_and_the_mean_of_the_first_two():
    from mixmae_scale.finetune.probe import readout_features

    maps = [torch.zeros(1, 4, 4, 2), torch.zeros(1, 2, 2, 3), torch.arange(45.0).view(1, 3, 3, 5)]
    maps[0][0, :2, :2, 0] = 4.0  # one quadrant of the first stage's first channel
    linear, knn = readout_features(maps)
    assert linear.shape == (1, 4 * (2 + 3) + 9 * 5) and knn.shape == (1, 2 + 3)
    assert linear[0, :4].tolist() == [4.0, 0.0, 0.0, 0.0]  # channel 0's grid: where the quadrant is
    assert linear[0, 4 * (2 + 3):].tolist() == maps[2][0].permute(2, 0, 1).flatten().tolist()  # the last map whole
    assert knn[0, 0] == 1.0  # its global mean: 4 over a quarter of the map


def test_probing_several_encoders_at_once_gives_each_the_result_it_gets_alone():
    """`probe_models` extracts features one encoder per thread: the results must not depend on that."""
    from mixmae_scale.finetune.probe import build_encoder, probe_model, probe_models

    arch = dict(img_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=[4, 4])
    generator = torch.Generator().manual_seed(0)
    train = (torch.randn(24, 3, 32, 32, generator=generator), torch.arange(24) % 3)
    val = (torch.randn(12, 3, 32, 32, generator=generator), torch.arange(12) % 3)
    models = [build_encoder(None, arch, 3, seed) for seed in (1, 2, 3)]
    alone = [probe_model(model, train, val, 3, batch=8) for model in models]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # at least two workers, whatever this machine has
    try:
        together = probe_models(models, train, val, 3, batch=8)
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads
    assert together == alone and len({r.top1 for r in alone} | {r.knn_top1 for r in alone}) > 1


def test_a_split_whose_images_would_not_fit_in_memory_is_refused_with_the_arithmetic_and_a_cap_that_fits():
    """The probe holds every image as fp32 and a val x train similarity matrix: ImageNet's manifest counts are over a
    terabyte, which it began decoding anyway (the documented `probe --data /data/imagenet-wds`)."""
    import pytest

    from mixmae_scale.data.errors import DataError
    from mixmae_scale.finetune.probe import probe_bytes, require_memory

    train, val, available = 1_281_167, 50_000, 256 * 10**9
    with pytest.raises(DataError) as refused:
        require_memory("/data/imagenet-wds", train, val, 224, available)
    said = str(refused.value)
    assert said.startswith("--data /data/imagenet-wds: the probe holds every image in memory as fp32 and a val x train "
                           "k-NN matrix: (1281167 train + 50000 val) x 3 x 224 x 224 x 4 B + 50000 x 1281167 x 4 B = "
                           "1058 GB, more than the 256 GB available; --max-samples ")
    cap = int(said.split("--max-samples ")[1].split()[0])
    assert probe_bytes(cap, val, 224) <= available < probe_bytes(cap + 1, val, 224)
    require_memory("/data/imagenet-wds", cap, val, 224, available)  # what it suggests goes through
    with pytest.raises(DataError, match="its 50000 validation images alone leave no room: probe a smaller set"):
        require_memory("/data/imagenet-wds", train, val, 224, 20 * 10**9)


def test_max_samples_reads_the_first_training_images_in_shard_order(demo_shards):
    from mixmae_scale.finetune.probe import load_images

    few, few_labels = load_images(str(demo_shards), "train", 32, 16, "torch", 1, max_samples=20)
    more, more_labels = load_images(str(demo_shards), "train", 32, 16, "torch", 1, max_samples=37)
    assert few.shape == (20, 3, 32, 32) and len(more) == 37
    assert torch.equal(few, more[:20]) and torch.equal(few_labels, more_labels[:20])


def test_a_probe_of_one_training_image_is_refused_naming_the_count_and_the_minimum():
    """One image has no spread to standardise the features by: the probe's L-BFGS met NaNs and stopped on "value
    cannot be converted to type float without overflow" (`probe --max-samples 1`)."""
    import pytest

    from mixmae_scale.data.errors import DataError

    one = Features(torch.randn(1, 8), torch.tensor([0]), torch.randn(4, 8), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(DataError, match="1 training image, fewer than the 2 "):
        probe_features(one, num_classes=2)
    two = Features(torch.randn(2, 8), torch.tensor([0, 1]), torch.randn(4, 8), torch.tensor([0, 1, 0, 1]))
    assert probe_features(two, num_classes=2).not_meaningful  # runs, and says it is not a result
    from mixmae_scale.cli import main
    from mixmae_scale.finetune.probe import MIN_FIT_IMAGES

    with pytest.raises(SystemExit):  # the command line takes the probe's own minimum
        main(["probe", "--init", "x", "--data", "y", "--max-samples", str(MIN_FIT_IMAGES - 1)])
    assert MIN_FIT_IMAGES == 2
