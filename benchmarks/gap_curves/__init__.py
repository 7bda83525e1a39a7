"""Does the gap close? MAE, DSMAE (teacher per epoch and per step) and its two ablations,
each pre-trained ONCE to the end of its schedule, with the linear probe and k-NN read at
checkpoints along the way; plus more seeds at one early checkpoint for the spread.

    python benchmarks/gap_curves run [--setting cpu] [--workers 2] [--out runs/gap_curves]
    python benchmarks/gap_curves report [--out runs/gap_curves]

``run`` starts ``--workers`` single-thread processes that share one queue of tasks (each
pre-training, then each evaluation), then writes the report. Every task leaves its result
in ``--out``; run it again after an interruption and it continues where it stopped (a
pre-training resumes from its newest checkpoint). ``report`` draws what is there.

Settings (``--setting``):

- ``cpu``: the equal-budget study's setting (``benchmarks/settings/cifar-cpu.yaml``): a
  6-block width-128 ViT, 32x32 real CIFAR-10 images in 4x4 patches, batch 128 in
  micro-batches of 32, base lr 1.5e-3 with 1 warm-up epoch, fp32 on the CPU, pre-trained
  on a fixed random 1,024 images of the train split.
- ``smoke``: the flow in seconds, for the tests (``settings/smoke.yaml``).
- ``paper``: the paper's own (ViT-Tiny 32/2 on the full 50k train split, SPEC defaults,
  batch 1024, on the GPU), for the GPU check.

Every schedule (learning rate, teacher momentum) is that of a run of ``--epochs``: the
checkpoint after 20 epochs of an 80-epoch run is read before its cosine has ended. The
evaluations (SPEC section 6, the library's defaults) read the mean of the patch tokens on
the FULL labelled train split and test on the test split: the linear probe by the fast
recipe (BatchNorm + linear, SGD, 90 epochs, the last epoch's top-1), and k-NN (k = 20,
T = 0.07). The encoder at random initialisation is the baseline.

Outputs in ``--out``: ``results.json`` (every number), ``results.md`` (the table), and the
figure ``gap_curves.png``; ``--figure`` and ``--json`` also copy the figure and the JSON
(e.g. to ``benchmarks/figures/`` and ``benchmarks/results/``).
"""

from parts import names_of_parts  # benchmarks/ is on the path (__main__.py, the tests)

# the package's parts, in the order they are read; their names are the package's too
PARTS = (
    "study",
    "claims",
    "tasks",
    "reporting",
    "cli",
)
__getattr__ = names_of_parts(__name__, PARTS)
