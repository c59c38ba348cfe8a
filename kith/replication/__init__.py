"""The replication mesh, wire-compatible with Sydent: this server's own binds and
unbinds are pushed, signed, to every peer (`pusher`), and the peers' pushes are taken in
over mutual TLS (`listener`, `receiver`), so that an address bound on one node is found
on all.  `node` puts the parts together for the server; `status` tells the operator how
far each peer is.
"""
