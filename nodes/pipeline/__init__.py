"""Pipeline stages: stage 0's steps out, a later stage's steps, the peer sockets between them."""
