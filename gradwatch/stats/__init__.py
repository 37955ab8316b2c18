"""Statistics of the gradients beyond their norms, as :class:`~gradwatch.Contributor` objects.

Pass them as ``GradWatch(model, stats=[...])``; their columns land in
:attr:`History.stats <gradwatch.History.stats>` as ``"<prefix>.<column>"``.

* :class:`NoiseScale` -- the gradient noise scale ``B_simple`` (McCandlish et
  al. 2018), from the micro-batch and step gradients of gradient accumulation
  or data parallelism.
* :class:`PerExampleNorms` -- the L2 norm of each example's contribution to
  the step's gradient (ghost norms), to find the examples behind a spike.
"""

from gradwatch.stats.examples import PerExampleNorms
from gradwatch.stats.noise import NoiseScale

__all__ = ["NoiseScale", "PerExampleNorms"]
