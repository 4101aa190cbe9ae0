"""The resumable training loader: global batches that are a pure function of (seed, iteration),
sharded over processes, resumable at any iteration, with per-sample augmentation seeds."""

import itertools

import numpy as np
import pytest
import torch
from detectron2.data.samplers import TrainingSampler

from dcnv2.data.resumable import GlobalBatchSampler, ResumableTrainLoader, _SeededMapDataset


def _take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


@pytest.mark.parametrize("groups", [None, [0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0]])
def test_processes_split_the_global_batch_of_one_process(groups):
    one = GlobalBatchSampler(11, 4, seed=3, aspect_groups=groups, rank=0, world_size=1)
    shards = [
        GlobalBatchSampler(11, 4, seed=3, aspect_groups=groups, rank=r, world_size=w)
        for w in (2, 4)
        for r in range(w)
    ]
    batches = _take(one, 12)
    two = list(zip(_take(shards[0], 12), _take(shards[1], 12)))
    four = list(zip(*(_take(s, 12) for s in shards[2:])))
    assert [a + b for a, b in two] == batches
    assert [a + b + c + d for a, b, c, d in four] == batches
    if groups is not None:  # a batch holds images of one orientation
        assert all(len({groups[i] for i, _ in b}) == 1 for b in batches)


def test_the_stream_is_detectron2s_and_every_pass_is_a_permutation():
    sampler = GlobalBatchSampler(7, 7, seed=5, rank=0, world_size=1)
    ours = [i for batch in _take(sampler, 3) for i, _ in batch]
    theirs = list(itertools.islice(iter(TrainingSampler(7, seed=5)), 21))
    assert ours == theirs
    assert all(sorted(ours[k : k + 7]) == list(range(7)) for k in (0, 7, 14))
    seeds = [s for batch in _take(sampler, 3) for _, s in batch]
    assert len(set(seeds)) == 21  # one seed per position in the stream, not per image


@pytest.mark.parametrize("groups", [None, [1, 0, 0, 1, 1, 1, 0]])
def test_starting_at_an_iteration_continues_the_stream(groups):
    full = _take(GlobalBatchSampler(7, 2, seed=1, aspect_groups=groups, rank=1, world_size=2), 9)
    resumed = GlobalBatchSampler(7, 2, seed=1, aspect_groups=groups, rank=1, world_size=2)
    resumed.start_iter = 5
    assert _take(resumed, 4) == full[5:]


def test_bad_batch_sizes_are_clear_errors():
    with pytest.raises(ValueError, match=r"IMS_PER_BATCH \(3\) must be a positive multiple"):
        GlobalBatchSampler(5, 3, seed=0, rank=0, world_size=2)
    with pytest.raises(ValueError, match="training set is empty"):
        GlobalBatchSampler(0, 2, seed=0, rank=0, world_size=1)


def _augment(d):
    # Stands in for DatasetMapper: draws from numpy, python and torch's global generators.
    return {"id": d["id"], "flip": np.random.rand() < 0.5, "t": torch.rand(2)}


def test_mapping_is_seeded_per_sample_and_leaves_the_global_generators_alone():
    dicts = [{"id": i, "width": 4, "height": 3} for i in range(5)]
    dataset = _SeededMapDataset(dicts, _augment, skip_bad_images=False)
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    a, b, c = dataset[(2, 11)], dataset[(2, 11)], dataset[(2, 12)]
    assert torch.equal(torch.random.get_rng_state(), before)
    assert a["id"] == 2 and a["flip"] == b["flip"] and torch.equal(a["t"], b["t"])
    assert not torch.equal(a["t"], c["t"])


def test_loader_batches_do_not_depend_on_worker_processes():
    dicts = [{"id": i, "width": 4 + i % 2, "height": 4} for i in range(6)]

    def batches(workers, start):
        loader = ResumableTrainLoader(dicts, _augment, 2, seed=7, num_workers=workers)
        loader.sampler.rank, loader.sampler.world_size = 0, 1
        loader.start_at(start)
        return [[(d["id"], float(d["t"][0])) for d in b] for b in itertools.islice(loader, 3)]

    assert batches(0, 0) == batches(2, 0)
    assert batches(0, 2)[0] == batches(0, 0)[2]
