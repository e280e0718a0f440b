"""Sweeps: many students in one process -- seeds and hyper-parameters, with error bars.

* :mod:`fkd.sweep.plan` -- seeds x grid points -> students, grouped by what one step can serve;
* :mod:`fkd.sweep.runner` -- training the groups (vmapped or looped), checkpoints, outputs;
* :mod:`fkd.sweep.stats` -- mean, std and Student-t intervals over seeds, the printed table;
* :mod:`fkd.sweep.plot` -- ``sweep.png``.
"""
