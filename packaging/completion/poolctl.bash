# bash completion for poolctl(1): commands, options and pool ids (read
# with "poolctl list --json", which any user may run).

_poolctl_pools()
{
    local bus=("$@")
    poolctl "${bus[@]}" list --json 2>/dev/null |
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

    local commands="list status start stop drain reload reset-breaker allow-restart events help"
    local cmd="" bus=() npos=0 i w
    for ((i = 1; i < cword; i++)); do
        w=${words[i]}
        case $w in
        --bus)
            bus=(--bus "${words[i+1]}")
            ((i++))
            ;;
        --bus=*) bus=("$w") ;;
        --deadline) ((i++)) ;;
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
    --deadline)
        COMPREPLY=($(compgen -W "0s 10s 30s 1m 5m" -- "$cur"))
        return
        ;;
    esac

    if [[ -z $cmd ]]; then
        if [[ $cur == -* ]]; then
            COMPREPLY=($(compgen -W "--bus --help" -- "$cur"))
        else
            COMPREPLY=($(compgen -W "$commands" -- "$cur"))
        fi
        return
    fi

    if [[ $cur == -* ]]; then
        local opts="--bus --help"
        case $cmd in
        list | status | events) opts+=" --json" ;;
        drain | reload) opts+=" --deadline" ;;
        start) opts+=" --no-block" ;;
        esac
        COMPREPLY=($(compgen -W "$opts" -- "$cur"))
        return
    fi

    case $cmd in
    help)
        ((npos == 0)) && COMPREPLY=($(compgen -W "$commands" -- "$cur"))
        ;;
    status | start | stop | drain | reset-breaker | allow-restart)
        ((npos == 0)) && COMPREPLY=($(compgen -W "$(_poolctl_pools "${bus[@]}")" -- "$cur"))
        ;;
    reload)
        if ((npos == 0)); then
            COMPREPLY=($(compgen -W "$(_poolctl_pools "${bus[@]}")" -- "$cur"))
        elif ((npos == 1)); then
            # a model: a path beneath the models directory
            compopt -o filenames 2>/dev/null
            COMPREPLY=($(compgen -f -- "$cur"))
        fi
        ;;
    esac
} &&
    complete -F _poolctl poolctl
