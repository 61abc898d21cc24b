"""The whole cluster on real Ray: pdcluster serve, healing and autoscaling."""
