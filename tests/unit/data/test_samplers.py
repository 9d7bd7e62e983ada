"""Epoch order from (seed, epoch) and the same multi-scale size on every DDP rank."""

from pipeline.data.samplers import MultiScaleBatchSampler, ShardedSampler, sample_seed


def _batches(rank: int, world: int, epoch: int, seed: int = 3) -> list[list[tuple[int, int]]]:
    """(index, size) of every sample of one epoch's batches."""
    sampler = ShardedSampler(50, shuffle=True, seed=seed, rank=rank, world_size=world)
    sampler.set_epoch(epoch)
    batches = MultiScaleBatchSampler(sampler, batch_size=4, sizes=[64, 96, 128], every=2, drop_last=True)
    return [[(key.index, key.size) for key in batch] for batch in batches]


def test_every_rank_gets_the_same_size_at_each_step_and_disjoint_samples():
    rank0, rank1 = _batches(0, 2, epoch=1), _batches(1, 2, epoch=1)
    assert len(rank0) == len(rank1) == 25 // 4
    assert [b[0][1] for b in rank0] == [b[0][1] for b in rank1]
    assert all(len({size for _, size in batch}) == 1 for batch in rank0)
    seen0 = {i for b in rank0 for i, _ in b}
    seen1 = {i for b in rank1 for i, _ in b}
    assert not seen0 & seen1


def test_size_changes_only_every_k_batches_and_uses_several_sizes():
    sizes = [b[0][1] for b in _batches(0, 1, epoch=0)]
    assert all(sizes[i] == sizes[i + 1] for i in range(0, len(sizes) - 1, 2))
    assert len({s for e in range(4) for s in (b[0][1] for b in _batches(0, 1, epoch=e))}) > 1


def test_order_is_a_function_of_seed_and_epoch():
    assert _batches(0, 1, epoch=2) == _batches(0, 1, epoch=2)
    assert _batches(0, 1, epoch=2) != _batches(0, 1, epoch=3)
    assert _batches(0, 1, epoch=2, seed=4) != _batches(0, 1, epoch=2)


def test_validation_sharding_scores_each_image_once():
    shards = [list(ShardedSampler(7, shuffle=False, seed=0, rank=r, world_size=2, pad=False)) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(7))


def test_len_matches_the_indices_it_yields():
    for size, world, pad in [(7, 2, False), (7, 2, True), (1, 4, True), (0, 2, True), (50, 3, False)]:
        for rank in range(world):
            sampler = ShardedSampler(size, shuffle=True, seed=0, rank=rank, world_size=world, pad=pad)
            assert len(sampler) == len(list(sampler))
    assert len(list(ShardedSampler(1, shuffle=False, seed=0, rank=3, world_size=4))) == 1  # padded, not empty


def test_augmentation_seeds_are_a_function_of_seed_epoch_and_index():
    sampler = ShardedSampler(20, shuffle=True, seed=5)
    batches = MultiScaleBatchSampler(sampler, batch_size=4, sizes=[64], every=1, drop_last=False)
    first = [key for batch in batches for key in batch]
    assert [k.seed for k in first] == [sample_seed(5, 0, k.index) for k in first]
    assert len({k.seed for k in first}) == 20
    sampler.set_epoch(1)
    assert {k.seed for batch in batches for k in batch}.isdisjoint({k.seed for k in first})


def test_resume_at_skips_the_trained_batches_of_that_epoch_only():
    sampler = ShardedSampler(20, shuffle=True, seed=5)
    batches = MultiScaleBatchSampler(sampler, batch_size=4, sizes=[64, 96], every=1, drop_last=False)
    sampler.set_epoch(2)
    whole = list(batches)
    batches.resume_at(2, 3)
    assert list(batches) == whole[3:]
    assert list(batches) == whole  # once: the next pass over the epoch is whole again
    batches.resume_at(1, 3)  # a position in another epoch does not apply
    assert list(batches) == whole
