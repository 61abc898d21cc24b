"""`pdcluster lab`: emulated hosts on one Linux machine (network namespaces on a bridge), each
a Ray node of its own, for trying and testing a multi-host cluster without the machines."""
