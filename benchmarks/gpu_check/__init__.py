"""The stages of ``benchmarks/gpu_check.sh``; each is run, and time-limited, on its own.

    python3 benchmarks/gpu_check STAGE RESULTS_DIR [--device cuda] [--seconds 120]
        [--data FOLDER] [--rows rates|speed] [--budget S] [--shrink]

Stages (each writes its own files into RESULTS_DIR, so one that fails leaves the others):

- ``smoke``: every ``dsmae`` command once on the quickstart-sized model, in this process,
  all eager in fp32, then pre-training and fine-tuning in bf16 compiled: ``smoke.json``
  (exit status, seconds and error line of each, written as each ends) and the pass/fail
  table ``smoke.md``.

- ``env``: the machine, torch/timm versions and a bf16 8192^3 matmul (the MFU
  denominator): ``env.json``.
- ``bench --rows rates|speed``: ``dsmae bench`` (:func:`dsmae.bench.run_bench`, in this
  process) in bf16 (:func:`bench_plan`): "rates", dsmae and mae at ViT-Tiny 32/2 (batch
  1024) compiled, the step rates pre-training plans with, the dsmae step also profiled
  (``profile-bench-dsmae-vit_tiny-compiled.json``, a chrome trace, and its
  ``profile_top`` operators); "speed", the rest of the MFU table (ViT-Tiny eager,
  ViT-Small 96/6 at batch 256 eager and compiled) and the A/B of each speed switch:
  ``bench-METHOD-ARCH-MODE.json``. A benchmark that would not finish inside
  ``--budget`` seconds is skipped and says so.
- ``pretrain-dsmae`` / ``pretrain-mae``: ``dsmae pretrain`` of the cifar10-vit-tiny preset
  (SPEC defaults) at batch 1024 on the CIFAR-10 folder ``--data``, both for the same
  epochs, as many as take ``--seconds`` each on average at the rates ``bench --rows
  rates`` measured (a method not measured yet is benchmarked first): warm-up and cosine
  end on time. ``pretrain-METHOD/`` and ``pretrain-METHOD.json``.
- ``equal-time``: mae pre-trained for the wall time dsmae's pre-training took
  (``--time-budget``), for the equal-time reading: ``pretrain-mae-equal-time/`` and
  ``pretrain-mae-equal-time.json``.
- ``eval``: the avg-pooled linear probe and k-NN (full train/test split) of both and of
  the random-init encoder, and the k-NN of the equal-time mae, all at once: ``eval.json``.
- ``summary``: ``summary.json`` and the markdown table ``summary.md``, printed.

``--shrink`` runs the same flow with tiny models and batches, compiled steps on Dynamo's
``aot_eager`` backend rather than a CPU Inductor build (for the CPU test).
Nothing here installs anything: it runs with the interpreter that runs it.
"""

from parts import names_of_parts  # benchmarks/ is on the path (__main__.py, the tests)

# the package's parts, in the order they are read; their names are the package's too
PARTS = (
    "plan",
    "env",
    "smoke",
    "bench",
    "pretraining",
    "evaluate",
    "summary",
    "cli",
)
__getattr__ = names_of_parts(__name__, PARTS)
