"""Proof that a change of the code leaves the ``dsmae`` command's behaviour as it was
(issue 21, "Behaviour unchanged").

It drives the ``dsmae`` command only as a user does, ``python -m dsmae ...`` in a
subprocess, with the source tree ``--src`` first on ``PYTHONPATH`` (a git worktree's
``src``), so the one script and one virtual environment run any commit:

    git worktree add /work/before f764dff
    python benchmarks/behaviour_check snapshot --src /work/before/src --out /tmp/b/before
    python benchmarks/behaviour_check snapshot --src src --out /tmp/b/after
    python benchmarks/behaviour_check compare /tmp/b/before /tmp/b/after \
        [--allow steps/print-config/quickstart]
    python benchmarks/behaviour_check resume --src src --old /tmp/b/before --out /tmp/b/resume

``snapshot`` runs a fixed table of commands (:func:`snapshot_steps`) on one CPU thread
(``OMP_NUM_THREADS=1``, ``PYTHONHASHSEED=0``, ``--device cpu``) on scikit-learn's digits
and on a few images it writes from them: ``--print-config`` of every shipped preset (and
of none); a tiny ``pretrain`` of each method (dsmae, dsmae-ly, dsmae-lz, mae) with the
k-NN and health monitors on in epoch 2, a checkpoint every epoch and its linear probes;
then for dsmae and mae ``linprobe`` (both recipes), ``knn``, ``finetune``, ``denoise``,
``export`` (and ``--onnx`` where onnx is installed), ``features`` and ``plot`` (of a copy
of the run whose metrics have their timing values frozen, :func:`freeze_timings`: the
figure draws images/s); a tiny ``experiment table3`` on an image folder; and
``bench --json``. It writes
``OUT/behaviour.json`` (sorted keys), what every command did with its timing taken out:

* its printed lines (stdout and stderr apart), normalised by :func:`normalise_lines`: no
  clock time, logger names cut to the level (modules move), durations and rates as
  ``<t>``, the snapshot folder as ``<OUT>``, JSON lines without their timing keys;
* its files: ``metrics.jsonl`` and result JSONs without timing keys (:func:`is_timing_key`)
  and with ``run_id`` and paths normalised (a JSON that needs no normalisation is also
  hashed byte for byte), text files (configs, tables, feature file lists) as lines, the
  SHA-256 of every other file (exports, features, figures), and of checkpoints the SHA-256
  of each tensor of their state (the file bytes hold the run id).

The raw outputs stay in ``OUT`` (``logs/``, ``kept/`` for files a later command
overwrites). ``OUT/old_checkpoints/`` keeps the epoch-1 checkpoint of the dsmae and mae
pre-trainings; ``resume`` continues each with ``--resume`` in a fresh folder with the code
at ``--src`` and checks its metrics from that step on, its checkpoints, probes and figure
equal those of the uninterrupted run of the snapshot ``--old``. ``compare`` prints every
difference of two snapshots (key path, before, after) and exits 1 if there is any that no
``--allow PREFIX`` allows; else a summary of the items compared per kind.

A snapshot takes about 4 minutes on one CPU core. Run it twice on the same code and
``compare`` the two: no difference (the normalisation removes everything that varies).
"""

from parts import names_of_parts  # benchmarks/ is on the path (__main__.py, the tests)

# the package's parts, in the order they are read; their names are the package's too
PARTS = (
    "commands",
    "normalise",
    "record",
    "comparison",
    "resumption",
    "cli",
)
__getattr__ = names_of_parts(__name__, PARTS)
