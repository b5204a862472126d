//! End-to-end tests of the pure sync core: default rules, sandbox, merging, empty patches.
