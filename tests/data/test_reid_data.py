"""Re-ID folder readers, their tf.data pipeline, and retrieval evaluation of a model.

Tiny Market-1501 / DukeMTMC-reID folder trees are written into tmp_path with
random JPEGs (nothing is downloaded): 4 training ids x 2 cameras x 2 images plus
a junk box and a Thumbs.db; 4 query ids; a gallery with same-camera images,
junk and a distractor.
"""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from dhm_keras import models
from dhm_keras.data import DatasetNotFoundError, normalize_reference_np
from dhm_keras.data.reid import (
    REID_DATASETS,
    ReidDatasetNotFoundError,
    is_reid_dataset,
    make_reid_dataset,
    make_reid_training_stream,
    parse_name,
    read_split,
    reid_info,
)
from dhm_keras.evaluation import (
    RetrievalEvaluator,
    evaluate,
    evaluate_model,
    extract_features,
    feature_extractor,
    pairwise_distances,
)
from dhm_keras.model import DHMModel
from official.modeling import optimization

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
NATIVE = (128, 64)  # Market-1501's crop size
TRAIN_IDS = (2, 7, 11, 15)  # not contiguous: labels must come out 0..3
TEST_IDS = (3, 5, 8, 9)


def _write_jpeg(path, rng, size=NATIVE):
    pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    tf.io.write_file(str(path), tf.io.encode_jpeg(pixels, quality=95))


def _make_market(root, rng):
    train, query, gallery = (root / f for f in ("bounding_box_train", "query", "bounding_box_test"))
    for folder in (train, query, gallery):
        folder.mkdir(parents=True)
    for pid in TRAIN_IDS:
        for cam in (1, 2):
            for frame in (1, 2):
                _write_jpeg(train / f"{pid:04d}_c{cam}s1_{frame:06d}_01.jpg", rng)
    _write_jpeg(train / "-1_c1s1_000401_03.jpg", rng)  # junk
    (train / "Thumbs.db").write_bytes(b"not an image")
    for pid in TEST_IDS:
        _write_jpeg(query / f"{pid:04d}_c1s1_000100_00.jpg", rng)
        _write_jpeg(gallery / f"{pid:04d}_c1s1_000200_01.jpg", rng)  # same camera as query
        for frame in (3, 4):
            _write_jpeg(gallery / f"{pid:04d}_c2s1_{frame:06d}_01.jpg", rng)
    _write_jpeg(gallery / "-1_c2s1_000500_01.jpg", rng)  # junk: dropped
    _write_jpeg(gallery / "0000_c3s1_000600_01.jpg", rng)  # distractor: kept
    return root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("reid")
    rng = np.random.default_rng(0)
    _make_market(base / "market1501", rng)
    duke = base / "DukeMTMC-reID"
    for folder in ("bounding_box_train", "query", "bounding_box_test"):
        (duke / folder).mkdir(parents=True)
    sizes = ((150, 60), (180, 72), (120, 50), (150, 64))  # Duke crops vary in size
    for (pid, cam), size in zip(((5, 2), (5, 7), (9, 3), (9, 8)), sizes):
        _write_jpeg(duke / "bounding_box_train" / f"{pid:04d}_c{cam}_f{pid * 1000 + cam:07d}.jpg",
                    rng, size=size)
    _write_jpeg(duke / "query" / "0012_c1_f0046985.jpg", rng, size=(170, 70))
    _write_jpeg(duke / "bounding_box_test" / "0012_c6_f0046990.jpg", rng, size=(140, 50))
    _write_jpeg(duke / "bounding_box_test" / "0013_c8_f0047000.jpg", rng, size=(120, 44))
    return str(base)


def _decoded(path):
    return tf.io.decode_jpeg(tf.io.read_file(path), channels=3).numpy()


# ----------------------------------------------------------------------------- reading


def test_names_and_registry():
    assert parse_name("0002_c1s1_000451_03.jpg", 6) == (2, 0)
    assert parse_name("-1_c3s2_000451_03.jpg", 6) == (-1, 2)
    assert parse_name("0005_c2_f0046985.jpg", 8) == (5, 1)
    with pytest.raises(ValueError, match="camera 7"):
        parse_name("0005_c7_f0046985.jpg", 6)
    with pytest.raises(ValueError, match="Cannot parse"):
        parse_name("person5.jpg", 6)
    assert set(REID_DATASETS) == {"market1501", "dukemtmc_reid"}
    assert is_reid_dataset("market1501") and is_reid_dataset("dukemtmc_reid")
    assert not is_reid_dataset("cifar100")


def test_market_splits_parse_and_filter(data_dir):
    train = read_split("market1501", "train", data_dir)
    query = read_split("market1501", "query", data_dir)
    gallery = read_split("market1501", "gallery", data_dir)
    assert len(train) == 16 and {r.pid for r in train} == set(TRAIN_IDS)  # no junk, no Thumbs.db
    assert {r.camid for r in train} == {0, 1}  # cameras c1, c2 stored 0-based
    assert [r.pid for r in query] == list(TEST_IDS)
    assert len(gallery) == 13  # 4 ids x 3 + the distractor; junk dropped
    assert sorted({r.pid for r in gallery}) == [0, *TEST_IDS]
    assert [r for r in gallery if r.pid == 0][0].camid == 2
    assert [os.path.basename(r.path) for r in gallery] == sorted(
        os.path.basename(r.path) for r in gallery
    )


def test_reid_info(data_dir):
    info = reid_info("market1501", data_dir)
    assert info.num_classes == 4 and info.image_shape == (256, 128, 3)
    assert dict(info.splits) == {"train": 16, "query": 4, "gallery": 13}
    assert info.num_examples("train") == 16 and info.num_examples("gallery") == 13
    with pytest.raises(ValueError, match="Cannot size split"):
        info.num_examples("test")
    assert info.data_dir == os.path.join(data_dir, "market1501")
    duke = reid_info("dukemtmc_reid", data_dir)  # found as DukeMTMC-reID/
    assert duke.num_classes == 2 and dict(duke.splits) == {"train": 4, "query": 1, "gallery": 2}
    assert {r.camid for r in read_split("dukemtmc_reid", "train", data_dir)} == {1, 6, 2, 7}


def test_alternative_root_name(tmp_path):
    _make_market(tmp_path / "Market-1501-v15.09.15", np.random.default_rng(1))
    assert reid_info("market1501", str(tmp_path)).num_classes == 4
    # data_dir may also be the dataset root itself.
    root = str(tmp_path / "Market-1501-v15.09.15")
    assert reid_info("market1501", root).splits["query"] == 4


def test_missing_dataset_error_names_paths_and_flag(tmp_path):
    with pytest.raises(ReidDatasetNotFoundError) as err:
        reid_info("market1501", str(tmp_path))
    message = str(err.value)
    assert isinstance(err.value, DatasetNotFoundError)
    assert os.path.join(str(tmp_path), "market1501") in message
    assert "Market-1501-v15.09.15" in message and "--data_dir" in message
    (tmp_path / "dukemtmc_reid" / "bounding_box_train").mkdir(parents=True)
    with pytest.raises(ReidDatasetNotFoundError, match="lacks .*query"):
        make_reid_dataset("dukemtmc_reid", "train", data_dir=str(tmp_path),
                          global_batch_size=2, training=True)


# ----------------------------------------------------------------------------- pipeline


def _batches(ds):
    return [(x.numpy(), y) for x, y in ds]


def test_train_batches_shapes_labels_and_range(data_dir):
    ds = make_reid_dataset("market1501", "train", data_dir=data_dir, global_batch_size=6,
                           training=True, seed=3)
    batches = _batches(ds)
    assert len(batches) == 2  # 16 // 6, remainder dropped
    images, labels = batches[0]
    assert images.shape == (6, 256, 128, 3) and images.dtype == np.float32
    assert labels.dtype == tf.int32
    mean, std = (np.array(v, np.float32) for v in IMAGENET)
    lo, hi = (0 - mean) / std, (1 - mean) / std
    assert np.all(images >= lo - 1e-5) and np.all(images <= hi + 1e-5)
    # Pad-10 crops put black (normalised 0 pixels) borders in some images.
    assert np.isclose(images, lo, atol=1e-5).all(-1).any()
    # Every example once per epoch with batch 8: labels 0..3, four of each.
    full = make_reid_dataset("market1501", "train", data_dir=data_dir, global_batch_size=8,
                             training=True, seed=3)
    labels = np.concatenate([y.numpy() for _, y in full])
    assert sorted(labels.tolist()) == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4


def test_train_augmentation_is_seeded(data_dir):
    def make(seed, epoch=0):
        return make_reid_dataset("market1501", "train", data_dir=data_dir, global_batch_size=8,
                                 training=True, seed=seed, image_size=(64, 32),
                                 random_erasing=0.5, epoch=epoch)

    a, b = make(7), make(7)
    first_a, first_b = _batches(a), _batches(b)
    for (xa, ya), (xb, yb) in zip(first_a, first_b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya.numpy(), yb.numpy())
    # The next epoch draws new order/crops/erasures, and so does another seed.
    second_a = _batches(make(7, epoch=1))
    assert any(not np.array_equal(x1, x2) for (x1, _), (x2, _) in zip(first_a, second_a))
    other = _batches(make(8))
    assert any(not np.array_equal(x1, x2) for (x1, _), (x2, _) in zip(first_a, other))


def test_train_images_are_padded_crops_or_flips_of_their_source(data_dir):
    padding = 2
    ds = make_reid_dataset("market1501", "train", data_dir=data_dir, global_batch_size=8,
                           training=True, seed=0, image_size=NATIVE, padding=padding)
    records = read_split("market1501", "train", data_dir)
    labels = {pid: i for i, pid in enumerate(sorted(TRAIN_IDS))}
    by_label = {}
    for r in records:
        by_label.setdefault(labels[r.pid], []).append(_decoded(r.path))
    flips = 0
    for images, ys in ds:
        for image, y in zip(images.numpy(), ys.numpy()):
            found = None
            for source in by_label[int(y)]:
                padded = np.pad(source, ((padding, padding), (padding, padding), (0, 0)))
                for flip in (False, True):
                    for dy in range(2 * padding + 1):
                        for dx in range(2 * padding + 1):
                            crop = padded[dy:dy + NATIVE[0], dx:dx + NATIVE[1]]
                            crop = crop[:, ::-1] if flip else crop
                            want = normalize_reference_np(crop, *IMAGENET)
                            if np.array_equal(image, want):
                                found = flip
                                break
                        if found is not None:
                            break
                    if found is not None:
                        break
                if found is not None:
                    break
            assert found is not None, "a training image is no crop/flip of its own identity"
            flips += found
    assert 0 < flips < 16  # both flipped and unflipped images occur


def test_random_erasing_zeroes_one_rectangle(data_dir):
    def images(p):
        ds = make_reid_dataset("market1501", "train", data_dir=data_dir, global_batch_size=8,
                               training=True, seed=1, random_erasing=p)
        return np.concatenate([x.numpy() for x, _ in ds])

    h, w = 256, 128
    for image in images(1.0):
        zero = (image == 0).all(-1)
        rows, cols = np.nonzero(zero)
        box = zero[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert box.all(), "erased pixels do not form a rectangle"
        area = box.size / (h * w)
        assert 0.015 < area < 0.41 and box.shape[0] < h and box.shape[1] < w
        assert 0.25 < box.shape[0] / box.shape[1] < 3.6
    # p = 0: no pixel is exactly the mean (0 after normalisation) in all channels.
    assert not (images(0.0) == 0).all(-1).any()
    with pytest.raises(ValueError, match="random_erasing"):
        make_reid_dataset("market1501", "train", data_dir=data_dir, global_batch_size=8,
                          training=True, random_erasing=1.5)


def test_query_gallery_are_exact_deterministic_and_complete(data_dir):
    ds = make_reid_dataset("market1501", "gallery", data_dir=data_dir, global_batch_size=5,
                           training=False, image_size=NATIVE)
    first, second = list(ds), list(ds)
    assert [x.shape[0] for x, _ in first] == [5, 5, 3]  # remainder kept
    for (x1, m1), (x2, m2) in zip(first, second):
        np.testing.assert_array_equal(x1.numpy(), x2.numpy())
        np.testing.assert_array_equal(m1["pid"].numpy(), m2["pid"].numpy())
    records = read_split("market1501", "gallery", data_dir)
    images = np.concatenate([x.numpy() for x, _ in first])
    want = normalize_reference_np(np.stack([_decoded(r.path) for r in records]), *IMAGENET)
    np.testing.assert_array_equal(images, want)  # no augmentation, exact normalisation
    pids = np.concatenate([m["pid"].numpy() for _, m in first])
    camids = np.concatenate([m["camid"].numpy() for _, m in first])
    assert pids.dtype == np.int32 and camids.dtype == np.int32
    np.testing.assert_array_equal(pids, [r.pid for r in records])
    np.testing.assert_array_equal(camids, [r.camid for r in records])
    # Default size 256x128, explicit statistics honoured.
    x, _ = next(iter(make_reid_dataset("market1501", "query", data_dir=data_dir,
                                       global_batch_size=4, training=False,
                                       mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))))
    assert x.shape == (4, 256, 128, 3) and -1.0 <= x.numpy().min() and x.numpy().max() <= 1.0
    with pytest.raises(ValueError, match="never augmented"):
        make_reid_dataset("market1501", "query", data_dir=data_dir, global_batch_size=4,
                          training=True)


def test_duke_variable_sizes_are_resized(data_dir):
    ds = make_reid_dataset("dukemtmc_reid", "train", data_dir=data_dir, global_batch_size=4,
                           training=True, seed=0, cache=True)
    for _ in range(2):  # second epoch reads the cache
        (x, y), = list(ds)
        assert x.shape == (4, 256, 128, 3) and sorted(y.numpy().tolist()) == [0, 0, 1, 1]
    # The training stream permutes whole epochs, cached crops of every size included.
    stream = make_reid_training_stream("dukemtmc_reid", "train", data_dir=data_dir, global_batch_size=4,
                                       seed=0, cache=True, first_epoch=1)
    for x, y in stream.take(2):
        assert x.shape == (4, 256, 128, 3) and sorted(y.numpy().tolist()) == [0, 0, 1, 1]


# ----------------------------------------------------------------------------- model + evaluation

SMALL = (64, 32)


@pytest.fixture(scope="module")
def small_splits(data_dir):
    kwargs = dict(data_dir=data_dir, image_size=SMALL, global_batch_size=4)
    return (
        make_reid_dataset("market1501", "train", training=True, seed=0,
                          **{**kwargs, "global_batch_size": 8}),
        make_reid_dataset("market1501", "query", training=False, **kwargs),
        make_reid_dataset("market1501", "gallery", training=False, **kwargs),
    )


@pytest.fixture(scope="module")
def network(data_dir):
    keras.utils.set_random_seed(0)
    num_classes = reid_info("market1501", data_dir).num_classes
    return models.build("mobilenet_reid", num_classes, mode="dhm", input_shape=(*SMALL, 3),
                        blocks_per_stage=1)


def test_feature_extractor_feeds_the_b0_classifier(network, small_splits):
    features = feature_extractor(network)
    assert tuple(features.output.shape) == (None, 1024)
    images, _ = next(iter(small_splits[1]))
    f = features(images, training=False)
    logits = network(images, training=False)["b0"]
    classifier = network.get_layer("b0_classifier")
    np.testing.assert_allclose(classifier(f).numpy(), logits.numpy(), rtol=1e-5, atol=1e-5)
    # Also from a b0-only model (what DHMModel.main_branch returns).
    main = keras.Model(network.inputs, network.output["b0"])
    np.testing.assert_allclose(feature_extractor(main)(images).numpy(), f.numpy(), atol=1e-6)
    no_dense = keras.Model(network.inputs, {"b0": network.get_layer("b0_gap").output})
    with pytest.raises(ValueError, match="not a Dense"):
        feature_extractor(no_dense)


def test_evaluate_model_on_tiny_splits(network, small_splits):
    features = feature_extractor(network)
    feats, pids, camids = extract_features(features, small_splits[2])
    assert feats.shape == (13, 1024) and sorted(set(pids.tolist())) == [0, *TEST_IDS]
    for metric in ("euclidean", "cosine"):
        metrics = evaluate_model(features, small_splits[1], small_splits[2], metric=metric)
        assert set(metrics) >= {"rank1", "rank5", "rank10", "mAP"}
        assert 0 <= metrics["rank1"] <= metrics["rank5"] <= metrics["rank10"] <= 1
        assert 0 < metrics["mAP"] <= 1
        assert metrics["num_valid_queries"] == 4 and metrics["num_skipped_queries"] == 0
    # Each query ranks 12 gallery images (its same-camera one excluded, junk
    # dropped, the distractor kept) holding 2 matches: all found by rank 11.
    q_feats, q_pids, q_cams = extract_features(features, small_splits[1])
    cmc, _ = evaluate(pairwise_distances(q_feats, feats), q_pids, pids, q_cams, camids,
                      max_rank=11)
    assert cmc[10] == 1.0


def test_callback_adds_retrieval_metrics_after_fit(network, small_splits):
    train_ds, query_ds, gallery_ds = small_splits
    model = DHMModel(network, mode="dhm")
    # Eager steps: tracing this DHM train step costs ~50 s on a small CPU.
    model.compile(optimizer=optimization.L2SGD(0.01), run_eagerly=True)
    history = model.fit(train_ds, epochs=1, verbose=0,
                        callbacks=[RetrievalEvaluator(query_ds, gallery_ds)])
    logged = {k: history.history[f"val_{k}"][0] for k in ("rank1", "rank5", "rank10", "mAP")}
    assert all(0 <= v <= 1 for v in logged.values()) and logged["mAP"] > 0
    # Computed with the TRAINED weights: the same numbers as evaluating now.
    now = evaluate_model(feature_extractor(network), query_ds, gallery_ds)
    assert logged == pytest.approx({k: now[k] for k in logged})


def test_callback_schedule():
    callback = RetrievalEvaluator(None, None, every=2)
    callback.set_params({"epochs": 5})
    assert [e + 1 for e in range(5) if callback.should_evaluate(e)] == [2, 4, 5]
    logs = {"loss": 1.0}
    callback.on_epoch_end(0, logs)  # epoch 1: not evaluated, nothing touched
    assert logs == {"loss": 1.0}
    with pytest.raises(ValueError, match="every"):
        RetrievalEvaluator(None, None, every=0)
