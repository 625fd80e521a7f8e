"""The Ray glue: training workers and their launcher, distributed prior fit and sampling, sweeps."""
