"""dptrain: train models with differential privacy and report, honestly, what privacy costs.

Every epsilon comes from the shared accountant in the ``accounting`` package.
"""

__version__ = "0.1.0"
