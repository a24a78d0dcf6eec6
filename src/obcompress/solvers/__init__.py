"""Pure layer solvers on (W, H); see the submodules."""
