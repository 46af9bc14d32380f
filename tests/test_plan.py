import pytest

from pointvl.dataset.plan import ModelEntry, PlanMismatchError, make_plan, save_or_check_plan


def _models(n_train: int, n_test: int) -> list[ModelEntry]:
    return [ModelEntry("02958343", f"m{i:03d}", "car", "train" if i < n_train else "test", f"/x/{i}.obj")
            for i in range(n_train + n_test)]


def test_shards_hold_one_split_and_cover_every_instance_once():
    plan = make_plan(_models(10, 3), shard_size=8, views_per_model=2, fingerprint="f")
    ids = [i for s in plan.shards for i in s.instance_ids()]
    assert len(ids) == len(set(ids)) == 26
    for shard in plan.shards:
        assert {m.split for m in shard.models} == {shard.split}
        assert len(shard.instance_ids()) <= 8
    names = [s.final_name for s in plan.shards]
    assert names == ["train-00000-of-00003.parquet", "train-00001-of-00003.parquet",
                     "train-00002-of-00003.parquet", "test-00000-of-00001.parquet"]
    assert [s.index for s in plan.shards] == list(range(4))


def test_plan_is_kept_and_another_plan_refused(tmp_path):
    first = save_or_check_plan(str(tmp_path), make_plan(_models(4, 1), 2, 1, "a"))
    again = save_or_check_plan(str(tmp_path), make_plan(_models(4, 1), 2, 1, "a"))
    assert again == first
    with pytest.raises(PlanMismatchError, match="another input or config"):
        save_or_check_plan(str(tmp_path), make_plan(_models(5, 1), 2, 1, "b"))
