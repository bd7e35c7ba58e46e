"""The metadata service: the seam the data path asks (``api``) and its in-process
implementation (``local``)."""
