"""The methods' maths: FDRL and the DGflow-style refinement, in plain torch.

Nothing here imports Ray or MLflow (a test enforces it). ``divergences`` (losses and f'),
``flow`` (the Euler-Maruyama flow and its settings), ``priors``, ``networks``, ``step`` (one
training step) and ``sampler`` (the one sampler every caller uses), ``dgflow`` (refining a trained generator with
its discriminator: DGflow, DOT, DDLS) and ``generator_nets`` (the generators' networks).
"""
