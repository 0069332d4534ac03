# bash completion for poolctl(1): commands, options, pool ids (read with
# "poolctl list --json", which any user may run) and model refs (from the
# daemon's allowed model directories, never the current directory).

_poolctl_pools()
{
    poolctl "$@" list --json 2>/dev/null |
        sed -n 's/^ *"Id": "\([^"]*\)",\{0,1\}$/\1/p'
}

_poolctl()
{
    local cur prev words cword
    if declare -F _init_completion >/dev/null; then
        _init_completion -n = || return
    else
        cur=${COMP_WORDS[COMP_CWORD]}
        prev=${COMP_WORDS[COMP_CWORD-1]}
        words=("${COMP_WORDS[@]}")
        cword=$COMP_CWORD
    fi

    local commands="list status show logs events start ensure-ready stop restart drain reload enable disable is-ready wait reset-breaker allow-restart daemon-reload help"
    local cmd="" where=() npos=0 i w
    for ((i = 1; i < cword; i++)); do
        w=${words[i]}
        case $w in
        --bus | -H | --host)
            where=("$w" "${words[i+1]}")
            ((i++))
            ;;
        --bus=* | --host=*) where=("$w") ;;
        --deadline | --timeout | --for | -p | --property | -n | --lines) ((i++)) ;;
        -*) ;;
        *)
            if [[ -z $cmd ]]; then
                cmd=$w
            else
                ((npos++))
            fi
            ;;
        esac
    done

    case $prev in
    --bus)
        COMPREPLY=($(compgen -W "unix:path=/run/dbus/system_bus_socket" -- "$cur"))
        return
        ;;
    -H | --host)
        COMPREPLY=($(compgen -A hostname -- "$cur"))
        return
        ;;
    --deadline | --timeout)
        COMPREPLY=($(compgen -W "0 10s 30s 1min 5min" -- "$cur"))
        return
        ;;
    --for)
        COMPREPLY=($(compgen -W "stopped starting warming ready draining backoff failed idle sleeping waking" -- "$cur"))
        return
        ;;
    -p | --property)
        COMPREPLY=($(compgen -W "Id State Live Ready Draining ActiveLeases Slots Model ModelDigest EngineVersion DeviceMask LastError CrashCount RestartCount FailureStreak BreakerState NextRestartUSec Unit MainPID Operation Progress IdleSinceUSec" -- "$cur"))
        return
        ;;
    -n | --lines)
        COMPREPLY=($(compgen -W "10 50 100 all" -- "$cur"))
        return
        ;;
    esac

    if [[ $cur == -* ]]; then
        local opts="--bus --host --json --help"
        case $cmd in
        show) opts+=" --property --value" ;;
        logs) opts+=" --follow --lines" ;;
        start) opts+=" --no-block" ;;
        stop) opts+=" --deadline --now" ;;
        restart) opts+=" --deadline --now --no-block" ;;
        drain) opts+=" --deadline" ;;
        reload) opts+=" --deadline --runtime" ;;
        enable) opts+=" --now --runtime --no-block" ;;
        disable) opts+=" --now --runtime --deadline" ;;
        wait) opts+=" --for --timeout" ;;
        ensure-ready) opts+=" --timeout" ;;
        esac
        COMPREPLY=($(compgen -W "$opts" -- "$cur"))
        return
    fi

    if [[ -z $cmd ]]; then
        COMPREPLY=($(compgen -W "$commands" -- "$cur"))
        return
    fi

    case $cmd in
    help)
        ((npos == 0)) && COMPREPLY=($(compgen -W "$commands" -- "$cur"))
        ;;
    status | show | logs | start | ensure-ready | stop | restart | drain | enable | disable | is-ready | wait | reset-breaker | allow-restart)
        ((npos == 0)) && COMPREPLY=($(compgen -W "$(_poolctl_pools "${where[@]}")" -- "$cur"))
        ;;
    reload)
        if ((npos == 0)); then
            COMPREPLY=($(compgen -W "$(_poolctl_pools "${where[@]}")" -- "$cur"))
        elif ((npos == 1)) && ((${#where[@]} == 0)); then
            # Only what the daemon may load: beneath its ModelsDir (as
            # refs relative to it) and its ModelDirs= (absolute).
            local IFS=$'\n'
            COMPREPLY=($(poolctl __complete-models -- "$cur" 2>/dev/null))
            if ((${#COMPREPLY[@]} == 1)) && [[ ${COMPREPLY[0]} == */ ]]; then
                compopt -o nospace 2>/dev/null
            fi
        fi
        ;;
    esac
} &&
    complete -F _poolctl poolctl
