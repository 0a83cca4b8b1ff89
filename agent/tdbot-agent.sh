#!/bin/sh
# tdbot-agent: push this VM's activity to the tdbot heartbeat endpoint, once per run.
#
# Usage: tdbot-agent.sh [--print]
#   --print  write the JSON body to standard output instead of sending it.
#
# Settings come from /etc/tdbot-agent.env (another file with TDBOT_AGENT_ENV), lines
# of NAME=value; a variable already set in the environment is kept:
#   TDBOT_URL          base URL of the daemon's heartbeat endpoint, such as
#                      https://tdbot.example.org:8787 (the agent adds /v1/heartbeat)
#   TDBOT_VM_ID        this VM's TensorDock id
#   TDBOT_AGENT_TOKEN  this VM's token, printed by `tdbot agent-token VM_ID`
# TDBOT_AGENT_STATE names the file that keeps the network counters between runs
# (default /var/lib/tdbot-agent/network).
#
# One reading contains GPU utilisation (of the busiest GPU) and GPU memory in use (summed
# over GPUs) from nvidia-smi. A failure of nvidia-smi is sent as `error`. The reading
# also contains the 1-minute load average, network traffic in kbit/s since the previous
# run over every interface but lo, and the command line of every process except kernel
# threads. The script needs only a POSIX shell, awk, ps and curl.

set -u
umask 077

ENV_FILE=${TDBOT_AGENT_ENV:-/etc/tdbot-agent.env}
STATE_FILE=${TDBOT_AGENT_STATE:-/var/lib/tdbot-agent/network}
# The endpoint's limits: 1000 command lines of at most 1024 characters in a body of at
# most 64 KiB. The process list may use 56 KiB; a longer list is left out, never cut.
MAX_PROCESSES=1000
MAX_PROCESS_CHARS=1024
MAX_PROCESS_BYTES=57344
# Network counters older than this many seconds are not used for a rate.
MAX_NETWORK_INTERVAL=600

log() {
	printf 'tdbot-agent: %s\n' "$*" >&2
}

die() {
	log "$*"
	exit 1
}

# Print $1 without one pair of surrounding single or double quotes.
unquote() {
	case $1 in
	\"*\") value=${1#\"} && printf '%s' "${value%\"}" ;;
	\'*\') value=${1#\'} && printf '%s' "${value%\'}" ;;
	*) printf '%s' "$1" ;;
	esac
}

# Read the three settings from the env file without running it as a script.
read_env_file() {
	[ -r "$ENV_FILE" ] || return 0
	while IFS= read -r line || [ -n "$line" ]; do
		line=${line#export }
		case $line in
		TDBOT_URL=* | TDBOT_VM_ID=* | TDBOT_AGENT_TOKEN=*) ;;
		*) continue ;;
		esac
		name=${line%%=*}
		value=$(unquote "${line#*=}")
		# $name is one of the three names matched above, so eval receives no text from the file.
		eval "current=\${$name:-}"
		[ -n "$current" ] || eval "$name=\$value"
	done <"$ENV_FILE"
}

check_settings() {
	TDBOT_URL=${TDBOT_URL:-}
	TDBOT_VM_ID=${TDBOT_VM_ID:-}
	TDBOT_AGENT_TOKEN=${TDBOT_AGENT_TOKEN:-}
	[ -n "$TDBOT_VM_ID" ] || die "TDBOT_VM_ID is not set; add it to $ENV_FILE"
	[ -n "$PRINT_ONLY" ] && return 0
	case $TDBOT_URL in
	http://?* | https://?*) ;;
	*) die "TDBOT_URL must start with http:// or https://; set it in $ENV_FILE" ;;
	esac
	case $TDBOT_AGENT_TOKEN in
	*[!0-9a-f]* | '') die "TDBOT_AGENT_TOKEN must be the output of 'tdbot agent-token VM_ID'" ;;
	esac
	[ ${#TDBOT_AGENT_TOKEN} -eq 64 ] || die "TDBOT_AGENT_TOKEN must be 64 hexadecimal digits"
}

# The awk function that writes text as the inside of a JSON string.
AWK_ESCAPE='
function escape(text,   out, i, c) {
	if (text !~ /[\001-\037\\"]/)
		return text
	out = ""
	for (i = 1; i <= length(text); i++) {
		c = substr(text, i, 1)
		if (c == "\\")
			out = out "\\\\"
		else if (c == "\"")
			out = out "\\\""
		else if (c in control)
			out = out control[c]
		else
			out = out c
	}
	return out
}
BEGIN { for (i = 1; i < 32; i++) control[sprintf("%c", i)] = sprintf("\\u%04x", i) }
'

# Print $1 as a JSON string; line breaks become \n.
json_string() {
	printf '%s\n' "$1" | LC_ALL=C awk "$AWK_ESCAPE"'
		{ body = body (NR > 1 ? "\\n" : "") escape($0) }
		END { printf "\"%s\"", body }'
}

# Set GPU_UTIL and GPU_MEMORY from nvidia-smi, or ERROR when it fails.
read_gpus() {
	GPU_UTIL=null
	GPU_MEMORY=null
	if ! command -v nvidia-smi >/dev/null 2>&1; then
		ERROR="nvidia-smi not found"
		return
	fi
	if ! output=$(nvidia-smi --query-gpu=utilization.gpu,memory.used \
		--format=csv,noheader,nounits 2>&1); then
		ERROR="nvidia-smi failed: $(printf '%s\n' "$output" | head -n 1)"
		return
	fi
	if ! totals=$(printf '%s\n' "$output" | awk -F', *' '
		$0 == "" { next }
		$1 !~ /^[0-9]+(\.[0-9]+)?$/ || $2 !~ /^[0-9]+(\.[0-9]+)?$/ { bad = 1 }
		{ gpus++; if ($1 + 0 > util) util = $1 + 0; memory += $2 }
		END { if (bad || gpus == 0) exit 1; printf "%.1f %.1f\n", util, memory }'); then
		ERROR="nvidia-smi output not understood: $(printf '%s\n' "$output" | head -n 1)"
		return
	fi
	GPU_UTIL=${totals% *}
	GPU_MEMORY=${totals#* }
}

# Set CPU_LOAD to the 1-minute load average.
read_load() {
	CPU_LOAD=null
	[ -r /proc/loadavg ] || return 0
	read -r load _ </proc/loadavg
	case $load in
	'' | *[!0-9.]*) ;;
	*) CPU_LOAD=$load ;;
	esac
}

# Set NETWORK_KBPS from the byte counters and the previous run's counters.
read_network() {
	NETWORK_KBPS=null
	[ -r /proc/net/dev ] || return 0
	total=$(awk 'NR > 2 {
			split($0, part, ":")
			name = part[1]
			gsub(/ /, "", name)
			if (name == "lo") next
			split(part[2], field, " ")
			bytes += field[1] + field[9]
		}
		END { printf "%.0f\n", bytes }' /proc/net/dev)
	now=$(date +%s)
	if [ -r "$STATE_FILE" ]; then
		read -r saved_at saved_bytes <"$STATE_FILE" || true
		NETWORK_KBPS=$(awk -v now="$now" -v saved_at="${saved_at:-x}" -v total="$total" \
			-v saved_bytes="${saved_bytes:-x}" -v limit="$MAX_NETWORK_INTERVAL" 'BEGIN {
				numeric = "^[0-9]+$"
				if (saved_at !~ numeric || saved_bytes !~ numeric) { print "null"; exit }
				seconds = now - saved_at
				bytes = total - saved_bytes
				# A reboot resets the counters, and an old state would average away a burst.
				if (seconds <= 0 || seconds > limit || bytes < 0) { print "null"; exit }
				printf "%.1f\n", bytes * 8 / 1000 / seconds
			}')
	fi
	# A --print run leaves the counters for the next real run.
	[ -n "$PRINT_ONLY" ] || save_network "$now" "$total"
}

save_network() {
	mkdir -p "$(dirname "$STATE_FILE")" 2>/dev/null
	if printf '%s %s\n' "$1" "$2" >"$STATE_FILE.new" 2>/dev/null; then
		mv "$STATE_FILE.new" "$STATE_FILE"
	else
		log "cannot write $STATE_FILE, so network traffic is left out of the next reading too"
	fi
}

# Print the process command lines as a JSON array, or nothing when they do not fit.
read_processes() {
	ps -eo args= | LC_ALL=C awk -v max_count="$MAX_PROCESSES" \
		-v max_chars="$MAX_PROCESS_CHARS" -v max_bytes="$MAX_PROCESS_BYTES" "$AWK_ESCAPE"'
		# Kernel threads, such as [kworker/0:1], are shown in brackets.
		/^\[.*\]$/ { next }
		{
			item = "\"" escape(substr($0, 1, max_chars)) "\""
			list = list (count ? "," : "") item
			count++
		}
		END {
			if (count > max_count || length(list) + 2 > max_bytes) exit 3
			printf "[%s]", list
		}'
}

build_body() {
	ERROR=
	read_gpus
	read_load
	read_network
	if ! PROCESSES=$(read_processes); then
		log "the process list is too long to send, so it is left out"
		PROCESSES=
	fi

	error_json=null
	[ -z "$ERROR" ] || error_json=$(json_string "$ERROR")
	printf '{"vm_id":%s,"gpu_util_percent":%s,"gpu_memory_mb":%s,"cpu_load":%s,' \
		"$(json_string "$TDBOT_VM_ID")" "$GPU_UTIL" "$GPU_MEMORY" "$CPU_LOAD"
	printf '"network_kbps":%s,' "$NETWORK_KBPS"
	[ -z "$PROCESSES" ] || printf '"processes":%s,' "$PROCESSES"
	printf '"error":%s}\n' "$error_json"
}

# Send the body in $1. The token goes to curl on its standard input, never on its
# command line, where other users of the VM could read it.
send() {
	response=$(mktemp) || die "cannot create a temporary file"
	status=$(printf 'header = "Authorization: Bearer %s"\n' "$TDBOT_AGENT_TOKEN" |
		curl --silent --show-error --max-time 15 --retry 1 --config - \
			--header 'Content-Type: application/json' --data-binary "@$1" \
			--output "$response" --write-out '%{http_code}' \
			"${TDBOT_URL%/}/v1/heartbeat")
	code=$?
	text=$(head -c 500 "$response")
	rm -f "$response"
	[ "$code" -eq 0 ] || die "heartbeat to $TDBOT_URL failed: curl exit status $code"
	[ "$status" = 200 ] || die "heartbeat to $TDBOT_URL rejected with HTTP $status: $text"
}

main() {
	PRINT_ONLY=
	case ${1:-} in
	--print) PRINT_ONLY=1 ;;
	'') ;;
	*) die "usage: tdbot-agent.sh [--print]" ;;
	esac
	read_env_file
	check_settings

	if [ -n "$PRINT_ONLY" ]; then
		build_body
		return
	fi
	body=$(mktemp) || die "cannot create a temporary file"
	trap 'rm -f "$body"' EXIT
	build_body >"$body"
	send "$body"
}

main "$@"
