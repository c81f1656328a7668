"""Re-run detection on finished run dirs with the third-party CLI, using the signed-rank black-box statistic.

For runs whose victim the pipeline cannot resume (trained before ``marking.method`` entered the resume
fingerprint): the radmark-detect CLI is run on the run's own key, suspect, marked dir, probe / view settings and
``seeds.detection``, so the white-box result is reproduced exactly and the black-box one is recomputed with
``--blackbox-stat signed_rank``. The run's metrics.json gets the CLI's ``detect/*`` values,
``config/detection.blackbox_stat=signed_rank`` and the command (``detect/command``).

    python experiments/power/redetect_cli.py RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

from radmark.metrics import update_metrics

KEYS = ("whitebox_log10_p", "whitebox_cos_mean", "blackbox_log10_p", "blackbox_wins", "blackbox_n", "blackbox_ties",
        "blackbox_views", "blackbox_stat", "blackbox_sign_log10_p")


def redetect(run: Path) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    out = run / "redetect_signed_rank.json"
    cmd = [sys.executable, "-m", "radmark.detection.cli", "--key", str(run / "key.safetensors"),
           "--suspect", str(run / "victim" / "suspect.pt"), "--marked-dir", metrics["marking/marked_dir"],
           "--align-probes", str(metrics["config/detection.align_probes"]),
           "--blackbox-views", str(metrics["config/detection.blackbox_views"]), "--blackbox-stat", "signed_rank",
           "--detection-seed", str(metrics["seeds/detection"]), "--device", "cpu", "--out", str(out)]
    subprocess.run(cmd, check=True)
    result = json.loads(out.read_text())
    update_metrics(run, {**{f"detect/{k}": result[k] for k in KEYS}, "config/detection.blackbox_stat": "signed_rank",
                         "detect/command": " ".join(shlex.quote(c) for c in cmd)})
    return result


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        res = redetect(Path(arg))
        print(f"{arg}: white-box {res['whitebox_log10_p']:.2f}, black-box {res['blackbox_log10_p']:.2f} "
              f"({res['blackbox_wins']}/{res['blackbox_n']})")
