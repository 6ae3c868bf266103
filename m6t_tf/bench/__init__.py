"""What the benchmark and experiment scripts of `tools/` share.

  timing       interleaved rounds, paired ratios to a baseline of the same process, the machine
  stats        means, sample sd, t-intervals, paired differences, least-squares slopes
  flops        FLOPs of a traced graph, counted from its matmul ops' shapes
  report       JSON and markdown output
  processes    child processes that import this same package
  models       a gin config's model and `Trainer`, ready to step (and its parameter counts)
  dense        MoE vs its dense twin at one wall-clock budget, and the upcycling arms
  upcycle      dense → MoE upcycling of a checkpoint
  experiments  the paper's experiments at demo scale: runs, their curves, tables
  plots        matplotlib helpers of the experiments
  moe          the MoE layer benchmark, one module per suite

The scripts in `tools/` are the command lines; they import from here
(`from m6t_tf.bench import timing`). `stats`, `report` and `processes`
need no TensorFlow; a script that imports the others quiets TensorFlow's start-up first
(`cli.quiet_tensorflow`). Nothing in the rest of `m6t_tf` imports this package.
"""
