# Helpers shared by the launch/*.sh scripts (sourced; needs $PROG set by the caller).

die() { echo "$PROG: $*" >&2; exit 2; }

# Print one word so that a POSIX shell reads it back unchanged: bare when it is harmless,
# single-quoted otherwise. Used for exact, copy-pastable --dry-run output and remote command lines.
shquote() {
  local word=$1 q="'\\''"
  if [[ $word =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$word"
  else
    printf "'%s'" "${word//\'/$q}"
  fi
}

# Print a command (one argument per word) as one shell line.
print_cmd() {
  local words=() w
  for w in "$@"; do words+=("$(shquote "$w")"); done
  echo "${words[*]}"
}

# Parse "--flag=value" or "--flag value": sets VALUE, and SHIFT to the number of words used.
take_value() {
  if [[ $1 == *=* ]]; then
    VALUE=${1#*=}; SHIFT=1
  else
    (($# >= 2)) || die "flag $1 needs a value"
    VALUE=$2; SHIFT=2
  fi
}

is_positive_int() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }
