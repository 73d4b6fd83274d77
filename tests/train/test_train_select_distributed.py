"""train.select_by: quality under `accelerate launch` with 2 processes (DDP over gloo, DeepSpeed ZeRO-3 on CPU):
each rank answers its share of the validation records and the sums are all-reduced, so the logged quality is the
whole split's, both ranks keep the same checkpoint, and ZeRO-3's sharded weights generate in step."""

from __future__ import annotations

import json

import pytest
from test_distributed import cluster, launch  # noqa: F401 - the fixture is used by name
from test_train_select import _quality_of_saved_model, _rows

SELECT = {"select_by": "quality", "select": {"metric": "chrf", "max_new_tokens": 8, "max_records": 7,
                                            "batch_size": 2},  # 7 records: rank 0 answers 4, rank 1 three
          "eval_steps": 3, "save_steps": 3}


@pytest.mark.parametrize("config, train", [
    ("ddp", {"method": "full", "learning_rate": 2e-2}),
    ("zero3", {"method": "lora", "lora": {"r": 4, "alpha": 8}, "learning_rate": 5e-2}),
])
def test_each_rank_scores_a_share_and_the_whole_split_decides(cluster, config, train):  # noqa: F811
    run, info, ranks = launch(cluster, f"select-{config}", config, {**train, **SELECT})
    quality = dict(_rows(run, "eval_quality"))
    assert sorted(quality) == [3, 6]
    assert info["kept_step"] in quality and info["kept_val_quality"] == quality[info["kept_step"]]
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]  # both ranks loaded the same best checkpoint
    # the all-reduced figure is the quality of the whole (capped) split, measured again in one process
    assert _quality_of_saved_model(run, SELECT["select"]) == pytest.approx(quality[info["kept_step"]], abs=1e-6)
    assert json.loads((run / "train" / "student.json").read_text())["world_size"] == 2
