"""Code of the real peers (Synapse, Sydent), run in their own virtualenvs, that builds
test vectors the way those peers build them."""
