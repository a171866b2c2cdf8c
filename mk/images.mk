# Container images (`make images`). Owned by the images work; included from the Makefile.
