"""The one exception type svdtune raises for bad input."""


class SvdtuneError(ValueError):
    """Raised for input svdtune cannot honour: the message names the thing and the fix.

    A subclass of ValueError, so ``except ValueError`` also catches it. When it is
    raised, the model and files it was given are unchanged.
    """
