"""Know before you buy: engine profiles, a cluster simulator driven by the router's own
policies, and the P:D sizing search built on it."""
