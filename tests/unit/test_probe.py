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
    """`probe_models` encodes each batch one encoder per thread: the results must not depend on that."""
    from held_splits import in_batches

    from mixmae_scale.finetune.probe import build_encoder, probe_model, probe_models

    arch = dict(img_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=[4, 4])
    generator = torch.Generator().manual_seed(0)
    train = (torch.randn(24, 3, 32, 32, generator=generator), torch.arange(24) % 3)
    val = (torch.randn(12, 3, 32, 32, generator=generator), torch.arange(12) % 3)
    models = [build_encoder(None, arch, 3, seed) for seed in (1, 2, 3)]
    alone = [probe_model(model, in_batches(train, 8), in_batches(val, 8), 3) for model in models]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # at least two workers, whatever this machine has
    try:
        together = probe_models(models, in_batches(train, 8), in_batches(val, 8), 3)
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads
    assert together == alone and len({r.top1 for r in alone} | {r.knn_top1 for r in alone}) > 1


SWIN_B = dict(img_size=224, patch_size=4, embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32],
              window_size=[7, 7, 7, 7])


def test_the_probes_memory_is_its_features_and_the_largest_of_its_phases_transients_by_hand_for_swin_b():
    """ImageNet (1,281,167 train, 50,000 val, 1000 classes), Swin-B at 224 px, --baseline's four encoders, batches of
    64, two encoders at once (2 threads). Each term worked out here from the shapes, not from the module's helpers.
    The encoders' activations and the L-BFGS state were not counted before."""
    from mixmae_scale.finetune.probe import probe_bytes, probe_memory

    features = (1_281_167 + 50_000) * (4 + 1) * 13_184 * 4  # every encoder's features and one more copy
    images = 64 * 3 * 224 * 224 * 4
    activations = 64 * (224 // 4) ** 2 * 128 * (5 + 2 * 4) * 4  # the first stage's 56 x 56 tokens of 128, 13 maps
    linear_params = (4 * (128 + 256 + 512) + 9 * 1024 + 1) * 1000  # the linear read-out's 12,800 inputs + bias
    lbfgs = (2 * 20 + 15) * linear_params * 4  # 20 pairs of history, 15 more vectors
    logits = 3 * 1_281_167 * 1000 * 4
    knn = 1024 * 1_281_167 * 4 + 1_281_167 * (128 + 256) * 4  # a block of similarities, the normalised train set
    memory = probe_memory(1_281_167, 50_000, SWIN_B, 1000, models=4, batch=64, at_once=2)
    assert memory == {"features": features, "encoding": images + 2 * activations, "linear fit": lbfgs + logits,
                      "k-NN vote": knn}
    assert (features, images + 2 * activations, lbfgs + logits, knn) == (
        351_002_114_560, 2_710_306_816, 18_190_224_000, 7_215_532_544)
    assert probe_bytes(1_281_167, 50_000, SWIN_B, 1000, models=4, batch=64, at_once=2) == features + lbfgs + logits
    # The demo's size (96 px tiny encoder, 2600 + 1500 images, 10 classes): the encoding's transient is the largest.
    tiny = dict(img_size=96, patch_size=4, embed_dim=32, depths=[2, 2, 6, 2], num_heads=[1, 2, 4, 8],
                window_size=[6, 6, 6, 3])
    small = probe_memory(2600, 1500, tiny, 10, models=4, batch=64, at_once=2)
    assert small["encoding"] == 64 * 3 * 96 * 96 * 4 + 2 * 64 * 24 * 24 * 32 * 13 * 4 == 129_761_280
    assert probe_bytes(2600, 1500, tiny, 10, models=4, batch=64, at_once=2) == small["features"] + 129_761_280


def test_a_split_whose_features_would_not_fit_in_memory_is_refused_with_the_arithmetic_and_a_cap_that_fits():
    """The probe keeps every image's features for each encoder compared (13,184 floats for Swin-B, against 150,528
    for a 224 px image): all of ImageNet with --baseline's four encoders is 369 GB, which it began decoding anyway
    (the documented `probe --data /data/imagenet-wds`)."""
    import pytest

    from mixmae_scale.data.errors import DataError
    from mixmae_scale.finetune.probe import feature_dims, probe_bytes, require_memory

    assert feature_dims(SWIN_B) == 4 * (128 + 256 + 512) + 9 * 1024 + 128 + 256 == 13184
    train, val, available = 1_281_167, 50_000, 256 * 10**9
    setting = dict(classes=1000, models=4, batch=64, at_once=2)
    with pytest.raises(DataError) as refused:
        require_memory("/data/imagenet-wds", train, val, SWIN_B, available=available, **setting)
    said = str(refused.value)
    assert said.startswith("--data /data/imagenet-wds: the probe holds the features of every image for each of its 4 "
                           "encoders and one more copy, in fp32: (1281167 train + 50000 val) x 5 x 13184 x 4 B = "
                           "351.0 GB, and at most 18.2 GB more at once (encoding: 2.7 GB for a batch of images and 2 "
                           "encoders' activations; the linear fit: 18.2 GB for its L-BFGS state and logits; the k-NN "
                           "vote: 7.2 GB) = 369.2 GB, more than the 256.0 GB available; --max-samples ")
    cap = int(said.split("--max-samples ")[1].split()[0])
    assert probe_bytes(cap, val, SWIN_B, **setting) <= available < probe_bytes(cap + 1, val, SWIN_B, **setting)
    require_memory("/data/imagenet-wds", cap, val, SWIN_B, available=available, **setting)  # what it suggests fits
    # the documented example: 300,000 training images and the 50,000 validation ones, four encoders
    assert round(probe_bytes(300_000, val, SWIN_B, **setting) / 1e9, 1) == 98.7
    with pytest.raises(DataError, match="its 50000 validation images alone leave no room: probe a smaller set"):
        require_memory("/data/imagenet-wds", train, val, SWIN_B, available=10 * 10**9, **setting)


def test_feature_dims_counts_what_the_readouts_keep():
    from mixmae_scale.finetune.probe import build_encoder, feature_dims, readout_features

    arch = dict(img_size=32, patch_size=4, embed_dim=8, depths=[1, 1, 1], num_heads=[1, 2, 4], window_size=[4, 4, 2])
    with torch.no_grad():
        linear, knn = readout_features(build_encoder(None, arch, 3, 0).encoder.stage_maps(torch.zeros(2, 3, 32, 32)))
    assert linear.shape[1] + knn.shape[1] == feature_dims(arch)


DEMO_ARCH = dict(img_size=32, patch_size=4, embed_dim=8, depths=[1, 1, 1], num_heads=[1, 2, 4],
                 window_size=[4, 4, 2])


def test_streaming_gives_the_features_and_results_of_encoding_every_image_held_in_memory(demo_shards):
    """The probe encodes each batch as it is read. The way it was before, kept here as the reference: both splits
    decoded whole, then each model encoding the held images `batch` at a time, the models on threads (the old
    `encode` and `probe_models`). The batches are the same images (the loader's, `max_samples` cutting the last),
    and each model runs on a worker thread in both, so every feature must be the same bit for bit, and so the
    results, the random encoders' included. (Without no_grad inside the worker threads, where the caller's does not
    reach, the features differed by about 1e-6 and each batch kept its autograd graph.)"""
    from concurrent.futures import ThreadPoolExecutor

    from held_splits import load_images

    from mixmae_scale.finetune.probe import build_encoder, model_features, read_batches, readout_features

    shards, batch = str(demo_shards), 16
    models = [build_encoder(None, DEMO_ARCH, 10, seed) for seed in (0, 1, 2)]

    @torch.no_grad()
    def encode_held(model, images):  # the old `encode`
        model.eval()
        parts = [readout_features(model.encoder.stage_maps(images[i:i + batch])) for i in range(0, len(images), batch)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def held_features(model):  # the old `model_features`
        (train_linear, train_knn), (val_linear, val_knn) = encode_held(model, train[0]), encode_held(model, val[0])
        return Features(train_linear, train[1], val_linear, val[1], train_knn, val_knn)

    train = load_images(shards, "train", 32, batch, "torch", 1, max_samples=250)  # 250: the last batch is cut
    val = load_images(shards, "val", 32, batch, "torch", 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # two workers, as `probe --baseline` on 2 cores
    try:
        torch.set_num_threads(1)  # the old `probe_models`: threads // workers
        with ThreadPoolExecutor(2) as pool:
            held = list(pool.map(held_features, models))
        torch.set_num_threads(2)
        streamed = model_features(models, read_batches(shards, "train", 32, batch, "torch", 1, max_samples=250),
                                  read_batches(shards, "val", 32, batch, "torch", 1))
    finally:
        torch.set_num_threads(threads)
    assert len(streamed) == 3 and streamed[0].train_x.shape[0] == 250 and streamed[0].val_x.shape[0] == 80
    for old, new in zip(held, streamed, strict=True):
        for name in ("train_x", "train_y", "val_x", "val_y", "knn_train_x", "knn_val_x"):
            assert torch.equal(getattr(old, name), getattr(new, name)), name
            assert not getattr(new, name).requires_grad
    assert [probe_features(f, 10) for f in held] == [probe_features(f, 10) for f in streamed]


def test_no_more_than_one_batch_of_images_is_alive_while_the_probe_encodes(demo_shards, monkeypatch):
    """Counted, not timed: every batch the reader yields is tracked, and whenever an encoder runs at most one of
    them may still exist (before, both splits' images were all held until the last encoder had run)."""
    import gc
    import weakref

    from mixmae_scale.finetune import probe

    yielded: list[weakref.ref] = []
    most_alive = []

    def tracked(*args, **kwargs):
        for images, labels in probe.read_batches(*args, **kwargs):
            yielded.append(weakref.ref(images))
            yield images, labels

    models = [probe.build_encoder(None, DEMO_ARCH, 10, seed) for seed in (0, 1)]
    for model in models:
        encoder = model.encoder
        stage_maps = encoder.stage_maps

        def counted(images, stage_maps=stage_maps):
            gc.collect()
            most_alive.append(sum(ref() is not None for ref in yielded))
            return stage_maps(images)

        monkeypatch.setattr(encoder, "stage_maps", counted)
    shards = str(demo_shards)
    # Batches of 64: 5 + 2 of them, each encoder call behind a full gc.collect (a few tenths of a second each).
    features = probe.model_features(models, tracked(shards, "train", 32, 64, "torch", 1),
                                    tracked(shards, "val", 32, 64, "torch", 1))
    assert len(yielded) == 300 // 64 + 1 + 80 // 64 + 1 and len(most_alive) == 2 * len(yielded)
    assert max(most_alive) == 1 and features[0].train_x.shape[0] == 300


def test_the_knn_vote_in_blocks_of_validation_images_is_the_vote_on_the_whole_matrix(monkeypatch):
    """The old vote, on the whole val x train matrix, kept as the reference; blocks of 7 of 50 validation images
    (a last block of 1) must give the same top-1: each row's similarities are the same dot products."""
    import torch.nn.functional as F

    from mixmae_scale.finetune import probe

    def whole(train_x, train_y, val_x, val_y, num_classes):
        similarity = F.normalize(val_x, dim=1) @ F.normalize(train_x, dim=1).T
        nearest = similarity.topk(min(probe.KNN_NEIGHBOURS, len(train_x)), dim=1)
        votes = torch.zeros(len(val_x), num_classes).scatter_add_(1, train_y[nearest.indices],
                                                                  (nearest.values / probe.KNN_TEMPERATURE).exp())
        return 100 * float((votes.argmax(1) == val_y).float().mean())

    generator = torch.Generator().manual_seed(5)
    centres = torch.randn(5, 12, generator=generator)
    train_y, val_y = torch.arange(200) % 5, torch.arange(50) % 5
    train_x = centres[train_y] + 1.5 * torch.randn(200, 12, generator=generator)
    val_x = centres[val_y] + 1.5 * torch.randn(50, 12, generator=generator)
    expected = whole(train_x, train_y, val_x, val_y, 5)
    monkeypatch.setattr(probe, "KNN_CHUNK", 7)
    assert probe.knn_top1(train_x, train_y, val_x, val_y, 5) == expected and 30 < expected < 100


def test_max_samples_reads_the_first_training_images_in_shard_order(demo_shards):
    from held_splits import load_images

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


def test_a_probe_whose_training_images_are_all_of_one_class_is_refused_naming_the_class():
    """A folder of one class probed at top-1 100%, linear and k-NN: a read-out that has only ever seen one label
    answers it for every image. With 100 images of each split it was printed as a result."""
    import pytest

    from mixmae_scale.data.errors import DataError

    one_class = clusters(separation=1.0, seed=0, per_class=120, classes=1)
    with pytest.raises(DataError, match=r"every one of the probe's 120 training images is of class 0; a read-out "
                                        r"of one class"):
        probe_features(one_class, num_classes=1)
    # Two classes in the manifest but one among the training images read (a set sorted by class, --max-samples)
    sorted_two = clusters(separation=1.0, seed=0, per_class=120, classes=2)
    first = Features(sorted_two.train_x[:120], sorted_two.train_y[:120], sorted_two.val_x, sorted_two.val_y)
    with pytest.raises(DataError, match="of class 0"):
        probe_features(first, num_classes=2)


def test_one_random_encoder_is_given_no_spread_and_its_line_says_there_is_none():
    """`mixmae probe --baseline --baseline-seeds 1` printed `30.0 +- 0.0% random encoders`: a sample standard
    deviation of one value is undefined, and 0.0 reads as random encoders that all agree. The report holds null,
    and the line names the single encoder and how to get a spread."""
    from mixmae_scale.cli.encoder_commands import probe_line
    from mixmae_scale.finetune.probe import ProbeResult, margin_report

    pretrained = ProbeResult(top1=25.0, knn_top1=12.5, train_top1=90.0, train_samples=300, val_samples=120)
    report = margin_report(pretrained, [ProbeResult(30.0, 16.7, 50.0, 300, 120)])
    assert report["linear"]["random_init"]["std"] is None and report["linear"]["margin_in_spread"] is None
    line = probe_line(report["linear"])
    assert "+-" not in line, line
    assert line == ("25.0% pretrained vs 30.0% for one random encoder (-5.0 points; no spread to weigh them "
                    "against: --baseline-seeds 2 or more)")
