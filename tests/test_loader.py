"""Bucketed batches, padded targets, the grain loader and its exact resumption."""

import numpy as np
import pytest

from detrax.config.schema import DataConfig
from detrax.data.batching import Collate, bucket_shape, fill_size
from detrax.data.coco import DataError, read_coco
from detrax.data.loader import Augment, Loader, dataset
from detrax.data.synthetic import write_dataset

SMALL = DataConfig(scales=(96, 128), max_size=192, crop_scales=(100, 120), crop_size=(64, 96), val_size=128)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    write_dataset(str(root), num_images=14, seed=2)
    return read_coco(str(root), "train").records


def test_bucket_shape():
    assert bucket_shape(100, 129, 64) == (128, 192) and bucket_shape(128, 128, 128) == (128, 128)


def test_collate_pads_images_and_targets():
    x1, x2 = np.ones((50, 70, 3), np.uint8), 2 * np.ones((90, 30, 3), np.uint8)
    t = lambda n, i: {"labels": np.arange(n), "boxes": np.full((n, 4), 0.25, np.float32), "image_id": i,
                      "orig_size": (10, 20)}
    b = Collate(max_targets=4, step=32, batch_size=4)([(x1, t(2, 5)), (x2, t(4, 6)), (x1, t(0, 7))])
    assert b["pixels"].shape == (4, 96, 96, 3) and b["mask"].shape == (4, 96, 96)
    assert b["mask"][0, :50, :70].all() and b["mask"][0].sum() == 50 * 70
    assert b["mask"][1].sum() == 90 * 30 and (b["pixels"][1, :90, :30] == 2).all()
    assert (b["pixels"][0, 50:] == 0).all()
    np.testing.assert_array_equal(b["valid"], [[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(b["real"], [True, True, True, False])
    assert b["mask"][3].sum() == 1  # a blank keeps one pixel so that attention stays finite
    np.testing.assert_array_equal(b["image_id"], [5, 6, 7, -1])
    # a short batch is filled to a power of two times the devices, at most the batch size
    assert [fill_size(n, 8) for n in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    assert [fill_size(n, 12, multiple=3) for n in (1, 3, 4, 7, 12)] == [3, 3, 6, 12, 12]
    assert len(Collate(4, 32, batch_size=8)([(x1, t(2, 5))])["real"]) == 1  # one image: no blanks
    with pytest.raises(DataError, match="image 6 has 4 boxes, more than max_targets=3"):
        Collate(max_targets=3, step=32)([(x2, t(4, 6))])


def test_eval_batches_cover_every_image_once(records):
    ds = dataset(records, Augment(False, SMALL), 4, max_targets=8, step=64)
    seen = []
    for batch in Loader(ds):
        for i in np.flatnonzero(batch["real"]):
            rec = next(r for r in records if r["image_id"] == batch["image_id"][i])
            h, w = batch["size"][i]
            assert batch["mask"][i].sum() == h * w and batch["mask"][i, :h, :w].all()
            assert batch["valid"][i].sum() == len(rec["labels"])
            np.testing.assert_array_equal(batch["labels"][i][batch["valid"][i]], rec["labels"])
            assert tuple(batch["orig_size"][i]) == (rec["height"], rec["width"])
            seen.append(int(batch["image_id"][i]))
        assert batch["pixels"].shape[1] % 64 == 0 and batch["pixels"].shape[2] % 64 == 0
        for h, w in batch["size"][batch["real"]]:  # each image on its own bucket, whatever its batch holds
            assert batch["pixels"].shape[1:3] == bucket_shape(int(h), int(w), 64)
    assert sorted(seen) == sorted(r["image_id"] for r in records)


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def _same(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


@pytest.mark.parametrize("workers", [0, 1])
def test_resume_from_saved_state_gives_the_same_next_batches(records, workers):
    ds = dataset(records, Augment(True, SMALL), 2, max_targets=8, step=64, seed=5)
    with Loader(ds, workers=workers) as loader:
        _take(loader, 3)
        state = loader.state()
        want = _take(loader, 4)  # crosses the end of the first epoch (5 batches)
    with Loader(ds, workers=workers) as again:
        again.restore(state)
        got = _take(again, 4)
    assert _same(want, got)
    assert loader.padding_waste >= 0 and len(loader.shapes) >= 1


def test_epochs_reshuffle_and_shards_split(records):
    assert len(records) == 10
    ds = dataset(records, Augment(True, SMALL), 5, max_targets=8, step=64, seed=1)
    first, second = _take(Loader(ds), 2), _take(Loader(ds), 4)[2:]
    assert sorted(first[0]["image_id"].tolist() + first[1]["image_id"].tolist()) == \
        sorted(r["image_id"] for r in records)  # one epoch is a permutation
    assert not np.array_equal(first[0]["image_id"], second[0]["image_id"])  # the next epoch reshuffles
    ids = [set(np.concatenate([b["image_id"] for b in _take(Loader(dataset(
        records, Augment(True, SMALL), 1, max_targets=8, seed=1, shard=(i, 2))), 5)]).tolist())
        for i in range(2)]
    assert not ids[0] & ids[1] and len(ids[0] | ids[1]) == len(records)


def test_the_loader_reads_a_few_batches_ahead_not_the_whole_endless_dataset(records, monkeypatch):
    """grain's default read-ahead (500 batches on 16 threads) decoded, in a short training run, hundreds of
    batches it never used and held them in memory: the Loader keeps twice its threads ahead."""
    import time

    from detrax.data.loader import ShapeGroupedBatches

    made = []
    getitem = ShapeGroupedBatches.__getitem__
    monkeypatch.setattr(ShapeGroupedBatches, "__getitem__", lambda self, i: made.append(i) or getitem(self, i))
    with Loader(dataset(records, Augment(True, SMALL), 2, max_targets=8, step=64)) as loader:  # endless
        _take(loader, 3)
        time.sleep(1.0)  # time to read ahead
        assert 3 <= len(made) <= 3 + 4 + 2, len(made)  # the 3 taken, 4 ahead on 2 threads, 2 in flight


def test_shape_grouped_batches_see_each_image_once_per_epoch_and_waste_less(records):
    """Grouping by planned shape: every epoch is a permutation (remainder dropped), each image has the shape its
    plan said, and the padding is less than batching in the shuffled order."""
    from detrax.data.batching import padding_waste

    aug = Augment(True, DataConfig(scales=(64, 96, 128, 160, 192), max_size=256, crop_scales=(100, 120),
                                crop_size=(64, 96)))
    grouped = dataset(records, aug, 3, max_targets=8, step=16, seed=4, group=3)
    plain = dataset(records, aug, 3, max_targets=8, step=16, seed=4, group=1)
    assert grouped.per_epoch == 3  # 10 images in batches of 3: one left out each epoch
    waste = {}
    for name, ds in (("grouped", grouped), ("plain", plain)):
        batches = [ds[i] for i in range(3 * 8)]  # 8 epochs
        for e in range(8):
            ids = np.concatenate([b["image_id"] for b in batches[3 * e:3 * e + 3]])
            assert len(set(ids.tolist())) == 9  # no image twice in an epoch
        waste[name] = np.mean([padding_waste(b) for b in batches])
    assert waste["grouped"] < 0.8 * waste["plain"], waste
    for i in range(6):  # planned shapes are the shapes made
        batch = grouped[i]
        for k, (_, planned) in enumerate(grouped.planned(i)):
            assert tuple(batch["size"][k]) == planned


def test_hosts_pad_each_step_to_one_shape(records):
    """On several hosts, the batches of one step have one shape (the collective needs it): each host plans
    every host's batch from the annotations; each still reads only its own shard."""
    aug = Augment(True, DataConfig(scales=(64, 96, 128, 160, 192), max_size=256, crop_scales=(100, 120),
                                crop_size=(64, 96)))
    hosts = [dataset(records, aug, 2, max_targets=8, step=16, seed=4, shard=(i, 3)) for i in range(3)]
    mixed = 0
    for i in range(12):
        batches = [ds[i] for ds in hosts]
        assert len({b["pixels"].shape for b in batches}) == 1
        mixed += len({tuple(b["size"].max(0)) for b in batches}) > 1  # the hosts' own largest images differ
        ids = [set(b["image_id"].tolist()) for b in batches]
        assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert mixed > 0
