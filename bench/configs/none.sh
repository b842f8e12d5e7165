# shellcheck shell=bash
# CONFIG none: no filter at all, the baseline. N is ignored.
CFG_DESC="no filter"
