# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_hasync_global_optspecs
    string join \n c/config= v/verbose q/quiet json no-progress h/help V/version
end

function __fish_hasync_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_hasync_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_hasync_using_subcommand
    set -l cmd (__fish_hasync_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c hasync -n "__fish_hasync_needs_command" -s c -l config -d 'The configuration file' -r -F
complete -c hasync -n "__fish_hasync_needs_command" -s v -l verbose -d 'More detail on stderr (repeat for more)'
complete -c hasync -n "__fish_hasync_needs_command" -s q -l quiet -d 'Less on stderr: only warnings and errors (repeat for errors only)'
complete -c hasync -n "__fish_hasync_needs_command" -l json -d 'Print data as JSON on stdout (for scripts and monitoring)'
complete -c hasync -n "__fish_hasync_needs_command" -l no-progress -d 'No progress bars, even on a terminal'
complete -c hasync -n "__fish_hasync_needs_command" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c hasync -n "__fish_hasync_needs_command" -s V -l version -d 'Print version'
complete -c hasync -n "__fish_hasync_needs_command" -f -a "init" -d 'Write an annotated configuration file to start from (never overwrites)'
complete -c hasync -n "__fish_hasync_needs_command" -f -a "doctor" -d 'Check every node: SSH, host key, root, agent, service, database, state dir'
complete -c hasync -n "__fish_hasync_needs_command" -f -a "sync" -d 'Replicate the primary to its standbys: the whole cycle, or one part of it'
complete -c hasync -n "__fish_hasync_needs_command" -f -a "status" -d 'One line per node: role, epoch, reachable, service, database read-only, last cycle'
complete -c hasync -n "__fish_hasync_needs_command" -f -a "check" -d 'A Nagios / Icinga plugin: one status line with perfdata, and Prometheus metrics'
complete -c hasync -n "__fish_hasync_needs_command" -f -a "promote" -d 'Make a standby the primary (failover), and fence the old primary'
complete -c hasync -n "__fish_hasync_needs_command" -f -a "switchover" -d 'Planned, lossless role swap: the standby becomes the primary'
complete -c hasync -n "__fish_hasync_needs_command" -f -a "rejoin" -d 'Turn a fenced old primary into a standby of the current primary'
complete -c hasync -n "__fish_hasync_needs_command" -f -a "health-server" -d 'Serve /primary, /standby and /health over HTTP for a load balancer'
complete -c hasync -n "__fish_hasync_needs_command" -f -a "schedule" -d 'Run cycles on the [schedule] cron line, in the foreground (for systemd)'
complete -c hasync -n "__fish_hasync_needs_command" -f -a "completions" -d 'Print a shell completion script on stdout'
complete -c hasync -n "__fish_hasync_needs_command" -f -a "man" -d 'Write the man pages into a directory'
complete -c hasync -n "__fish_hasync_needs_command" -f -a "agent" -d 'The remote side of a replication, started by hasync over SSH'
complete -c hasync -n "__fish_hasync_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c hasync -n "__fish_hasync_using_subcommand init" -s c -l config -d 'The configuration file' -r -F
complete -c hasync -n "__fish_hasync_using_subcommand init" -l stdout -d 'Print the template on stdout instead of writing the config file'
complete -c hasync -n "__fish_hasync_using_subcommand init" -s v -l verbose -d 'More detail on stderr (repeat for more)'
complete -c hasync -n "__fish_hasync_using_subcommand init" -s q -l quiet -d 'Less on stderr: only warnings and errors (repeat for errors only)'
complete -c hasync -n "__fish_hasync_using_subcommand init" -l json -d 'Print data as JSON on stdout (for scripts and monitoring)'
complete -c hasync -n "__fish_hasync_using_subcommand init" -l no-progress -d 'No progress bars, even on a terminal'
complete -c hasync -n "__fish_hasync_using_subcommand init" -s h -l help -d 'Print help'
complete -c hasync -n "__fish_hasync_using_subcommand doctor" -s c -l config -d 'The configuration file' -r -F
complete -c hasync -n "__fish_hasync_using_subcommand doctor" -s v -l verbose -d 'More detail on stderr (repeat for more)'
complete -c hasync -n "__fish_hasync_using_subcommand doctor" -s q -l quiet -d 'Less on stderr: only warnings and errors (repeat for errors only)'
complete -c hasync -n "__fish_hasync_using_subcommand doctor" -l json -d 'Print data as JSON on stdout (for scripts and monitoring)'
complete -c hasync -n "__fish_hasync_using_subcommand doctor" -l no-progress -d 'No progress bars, even on a terminal'
complete -c hasync -n "__fish_hasync_using_subcommand doctor" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c hasync -n "__fish_hasync_using_subcommand sync" -l max-delete -d 'Allow this many deletions this time (overrides [files] max_delete)' -r
complete -c hasync -n "__fish_hasync_using_subcommand sync" -l to -d 'Only this standby (default: every standby)' -r
complete -c hasync -n "__fish_hasync_using_subcommand sync" -s c -l config -d 'The configuration file' -r -F
complete -c hasync -n "__fish_hasync_using_subcommand sync" -l files-only -d 'Replicate only the file tree'
complete -c hasync -n "__fish_hasync_using_subcommand sync" -l db-only -d 'Replicate only the database: stage, verify, mark read-only, swap'
complete -c hasync -n "__fish_hasync_using_subcommand sync" -s n -l dry-run -d 'Show what would change (itemized, like rsync -n -i) and change nothing'
complete -c hasync -n "__fish_hasync_using_subcommand sync" -l checksum -d 'Compare file contents by hash instead of size and modification time'
complete -c hasync -n "__fish_hasync_using_subcommand sync" -s v -l verbose -d 'More detail on stderr (repeat for more)'
complete -c hasync -n "__fish_hasync_using_subcommand sync" -s q -l quiet -d 'Less on stderr: only warnings and errors (repeat for errors only)'
complete -c hasync -n "__fish_hasync_using_subcommand sync" -l json -d 'Print data as JSON on stdout (for scripts and monitoring)'
complete -c hasync -n "__fish_hasync_using_subcommand sync" -l no-progress -d 'No progress bars, even on a terminal'
complete -c hasync -n "__fish_hasync_using_subcommand sync" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c hasync -n "__fish_hasync_using_subcommand status" -s c -l config -d 'The configuration file' -r -F
complete -c hasync -n "__fish_hasync_using_subcommand status" -s v -l verbose -d 'More detail on stderr (repeat for more)'
complete -c hasync -n "__fish_hasync_using_subcommand status" -s q -l quiet -d 'Less on stderr: only warnings and errors (repeat for errors only)'
complete -c hasync -n "__fish_hasync_using_subcommand status" -l json -d 'Print data as JSON on stdout (for scripts and monitoring)'
complete -c hasync -n "__fish_hasync_using_subcommand status" -l no-progress -d 'No progress bars, even on a terminal'
complete -c hasync -n "__fish_hasync_using_subcommand status" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c hasync -n "__fish_hasync_using_subcommand check" -l max-age -d 'CRITICAL when the standby\'s last successful cycle is older than this' -r
complete -c hasync -n "__fish_hasync_using_subcommand check" -l prom-file -d 'Also write Prometheus text-file metrics here (atomically)' -r -F
complete -c hasync -n "__fish_hasync_using_subcommand check" -s c -l config -d 'The configuration file' -r -F
complete -c hasync -n "__fish_hasync_using_subcommand check" -s v -l verbose -d 'More detail on stderr (repeat for more)'
complete -c hasync -n "__fish_hasync_using_subcommand check" -s q -l quiet -d 'Less on stderr: only warnings and errors (repeat for errors only)'
complete -c hasync -n "__fish_hasync_using_subcommand check" -l json -d 'Print data as JSON on stdout (for scripts and monitoring)'
complete -c hasync -n "__fish_hasync_using_subcommand check" -l no-progress -d 'No progress bars, even on a terminal'
complete -c hasync -n "__fish_hasync_using_subcommand check" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c hasync -n "__fish_hasync_using_subcommand promote" -l max-age -d 'Refuse (without --force) when the standby\'s last successful cycle is older' -r
complete -c hasync -n "__fish_hasync_using_subcommand promote" -s c -l config -d 'The configuration file' -r -F
complete -c hasync -n "__fish_hasync_using_subcommand promote" -s n -l dry-run -d 'Show what would be done and change nothing'
complete -c hasync -n "__fish_hasync_using_subcommand promote" -l force -d 'Promote even if the old primary is up or the standby is stale'
complete -c hasync -n "__fish_hasync_using_subcommand promote" -s v -l verbose -d 'More detail on stderr (repeat for more)'
complete -c hasync -n "__fish_hasync_using_subcommand promote" -s q -l quiet -d 'Less on stderr: only warnings and errors (repeat for errors only)'
complete -c hasync -n "__fish_hasync_using_subcommand promote" -l json -d 'Print data as JSON on stdout (for scripts and monitoring)'
complete -c hasync -n "__fish_hasync_using_subcommand promote" -l no-progress -d 'No progress bars, even on a terminal'
complete -c hasync -n "__fish_hasync_using_subcommand promote" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c hasync -n "__fish_hasync_using_subcommand switchover" -l to -d 'The standby that becomes the primary (default: the only standby)' -r
complete -c hasync -n "__fish_hasync_using_subcommand switchover" -s c -l config -d 'The configuration file' -r -F
complete -c hasync -n "__fish_hasync_using_subcommand switchover" -s n -l dry-run -d 'Show the plan (the cycle\'s, then the swap) and change nothing'
complete -c hasync -n "__fish_hasync_using_subcommand switchover" -s v -l verbose -d 'More detail on stderr (repeat for more)'
complete -c hasync -n "__fish_hasync_using_subcommand switchover" -s q -l quiet -d 'Less on stderr: only warnings and errors (repeat for errors only)'
complete -c hasync -n "__fish_hasync_using_subcommand switchover" -l json -d 'Print data as JSON on stdout (for scripts and monitoring)'
complete -c hasync -n "__fish_hasync_using_subcommand switchover" -l no-progress -d 'No progress bars, even on a terminal'
complete -c hasync -n "__fish_hasync_using_subcommand switchover" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c hasync -n "__fish_hasync_using_subcommand rejoin" -s c -l config -d 'The configuration file' -r -F
complete -c hasync -n "__fish_hasync_using_subcommand rejoin" -s n -l dry-run -d 'Show what would be quarantined and changed, and change nothing'
complete -c hasync -n "__fish_hasync_using_subcommand rejoin" -s v -l verbose -d 'More detail on stderr (repeat for more)'
complete -c hasync -n "__fish_hasync_using_subcommand rejoin" -s q -l quiet -d 'Less on stderr: only warnings and errors (repeat for errors only)'
complete -c hasync -n "__fish_hasync_using_subcommand rejoin" -l json -d 'Print data as JSON on stdout (for scripts and monitoring)'
complete -c hasync -n "__fish_hasync_using_subcommand rejoin" -l no-progress -d 'No progress bars, even on a terminal'
complete -c hasync -n "__fish_hasync_using_subcommand rejoin" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c hasync -n "__fish_hasync_using_subcommand health-server" -l listen -d 'Address and port to listen on' -r
complete -c hasync -n "__fish_hasync_using_subcommand health-server" -l node -d 'The node this runs on (default: the one with address = "local")' -r
complete -c hasync -n "__fish_hasync_using_subcommand health-server" -l probe-cache -d 'How long an answer about the application is reused, so that a check every few hundred ms does not run the probes each time' -r
complete -c hasync -n "__fish_hasync_using_subcommand health-server" -l probe-timeout -d 'How long the probes (status, health_url, writable_check) may take together; a probe that has not answered by then counts as down' -r
complete -c hasync -n "__fish_hasync_using_subcommand health-server" -s c -l config -d 'The configuration file' -r -F
complete -c hasync -n "__fish_hasync_using_subcommand health-server" -s v -l verbose -d 'More detail on stderr (repeat for more)'
complete -c hasync -n "__fish_hasync_using_subcommand health-server" -s q -l quiet -d 'Less on stderr: only warnings and errors (repeat for errors only)'
complete -c hasync -n "__fish_hasync_using_subcommand health-server" -l json -d 'Print data as JSON on stdout (for scripts and monitoring)'
complete -c hasync -n "__fish_hasync_using_subcommand health-server" -l no-progress -d 'No progress bars, even on a terminal'
complete -c hasync -n "__fish_hasync_using_subcommand health-server" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c hasync -n "__fish_hasync_using_subcommand schedule" -l next -d 'Print the next N run times and exit' -r
complete -c hasync -n "__fish_hasync_using_subcommand schedule" -s c -l config -d 'The configuration file' -r -F
complete -c hasync -n "__fish_hasync_using_subcommand schedule" -s v -l verbose -d 'More detail on stderr (repeat for more)'
complete -c hasync -n "__fish_hasync_using_subcommand schedule" -s q -l quiet -d 'Less on stderr: only warnings and errors (repeat for errors only)'
complete -c hasync -n "__fish_hasync_using_subcommand schedule" -l json -d 'Print data as JSON on stdout (for scripts and monitoring)'
complete -c hasync -n "__fish_hasync_using_subcommand schedule" -l no-progress -d 'No progress bars, even on a terminal'
complete -c hasync -n "__fish_hasync_using_subcommand schedule" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c hasync -n "__fish_hasync_using_subcommand completions" -s c -l config -d 'The configuration file' -r -F
complete -c hasync -n "__fish_hasync_using_subcommand completions" -s v -l verbose -d 'More detail on stderr (repeat for more)'
complete -c hasync -n "__fish_hasync_using_subcommand completions" -s q -l quiet -d 'Less on stderr: only warnings and errors (repeat for errors only)'
complete -c hasync -n "__fish_hasync_using_subcommand completions" -l json -d 'Print data as JSON on stdout (for scripts and monitoring)'
complete -c hasync -n "__fish_hasync_using_subcommand completions" -l no-progress -d 'No progress bars, even on a terminal'
complete -c hasync -n "__fish_hasync_using_subcommand completions" -s h -l help -d 'Print help'
complete -c hasync -n "__fish_hasync_using_subcommand man" -l out-dir -d 'Where to write hasync.1 and one page per subcommand' -r -F
complete -c hasync -n "__fish_hasync_using_subcommand man" -s c -l config -d 'The configuration file' -r -F
complete -c hasync -n "__fish_hasync_using_subcommand man" -s v -l verbose -d 'More detail on stderr (repeat for more)'
complete -c hasync -n "__fish_hasync_using_subcommand man" -s q -l quiet -d 'Less on stderr: only warnings and errors (repeat for errors only)'
complete -c hasync -n "__fish_hasync_using_subcommand man" -l json -d 'Print data as JSON on stdout (for scripts and monitoring)'
complete -c hasync -n "__fish_hasync_using_subcommand man" -l no-progress -d 'No progress bars, even on a terminal'
complete -c hasync -n "__fish_hasync_using_subcommand man" -s h -l help -d 'Print help'
complete -c hasync -n "__fish_hasync_using_subcommand agent" -l root -d 'Serve only this root (refuse a session naming another one)' -r -F
complete -c hasync -n "__fish_hasync_using_subcommand agent" -l state-dir -d 'This node\'s state_dir: the agent writes only if the state record there says standby at the caller\'s epoch (or there is none yet)' -r -F
complete -c hasync -n "__fish_hasync_using_subcommand agent" -s c -l config -d 'The configuration file' -r -F
complete -c hasync -n "__fish_hasync_using_subcommand agent" -l version -d 'Print the agent\'s version and protocol line and exit'
complete -c hasync -n "__fish_hasync_using_subcommand agent" -s v -l verbose -d 'More detail on stderr (repeat for more)'
complete -c hasync -n "__fish_hasync_using_subcommand agent" -s q -l quiet -d 'Less on stderr: only warnings and errors (repeat for errors only)'
complete -c hasync -n "__fish_hasync_using_subcommand agent" -l json -d 'Print data as JSON on stdout (for scripts and monitoring)'
complete -c hasync -n "__fish_hasync_using_subcommand agent" -l no-progress -d 'No progress bars, even on a terminal'
complete -c hasync -n "__fish_hasync_using_subcommand agent" -s h -l help -d 'Print help'
complete -c hasync -n "__fish_hasync_using_subcommand help; and not __fish_seen_subcommand_from init doctor sync status check promote switchover rejoin health-server schedule completions man agent help" -f -a "init" -d 'Write an annotated configuration file to start from (never overwrites)'
complete -c hasync -n "__fish_hasync_using_subcommand help; and not __fish_seen_subcommand_from init doctor sync status check promote switchover rejoin health-server schedule completions man agent help" -f -a "doctor" -d 'Check every node: SSH, host key, root, agent, service, database, state dir'
complete -c hasync -n "__fish_hasync_using_subcommand help; and not __fish_seen_subcommand_from init doctor sync status check promote switchover rejoin health-server schedule completions man agent help" -f -a "sync" -d 'Replicate the primary to its standbys: the whole cycle, or one part of it'
complete -c hasync -n "__fish_hasync_using_subcommand help; and not __fish_seen_subcommand_from init doctor sync status check promote switchover rejoin health-server schedule completions man agent help" -f -a "status" -d 'One line per node: role, epoch, reachable, service, database read-only, last cycle'
complete -c hasync -n "__fish_hasync_using_subcommand help; and not __fish_seen_subcommand_from init doctor sync status check promote switchover rejoin health-server schedule completions man agent help" -f -a "check" -d 'A Nagios / Icinga plugin: one status line with perfdata, and Prometheus metrics'
complete -c hasync -n "__fish_hasync_using_subcommand help; and not __fish_seen_subcommand_from init doctor sync status check promote switchover rejoin health-server schedule completions man agent help" -f -a "promote" -d 'Make a standby the primary (failover), and fence the old primary'
complete -c hasync -n "__fish_hasync_using_subcommand help; and not __fish_seen_subcommand_from init doctor sync status check promote switchover rejoin health-server schedule completions man agent help" -f -a "switchover" -d 'Planned, lossless role swap: the standby becomes the primary'
complete -c hasync -n "__fish_hasync_using_subcommand help; and not __fish_seen_subcommand_from init doctor sync status check promote switchover rejoin health-server schedule completions man agent help" -f -a "rejoin" -d 'Turn a fenced old primary into a standby of the current primary'
complete -c hasync -n "__fish_hasync_using_subcommand help; and not __fish_seen_subcommand_from init doctor sync status check promote switchover rejoin health-server schedule completions man agent help" -f -a "health-server" -d 'Serve /primary, /standby and /health over HTTP for a load balancer'
complete -c hasync -n "__fish_hasync_using_subcommand help; and not __fish_seen_subcommand_from init doctor sync status check promote switchover rejoin health-server schedule completions man agent help" -f -a "schedule" -d 'Run cycles on the [schedule] cron line, in the foreground (for systemd)'
complete -c hasync -n "__fish_hasync_using_subcommand help; and not __fish_seen_subcommand_from init doctor sync status check promote switchover rejoin health-server schedule completions man agent help" -f -a "completions" -d 'Print a shell completion script on stdout'
complete -c hasync -n "__fish_hasync_using_subcommand help; and not __fish_seen_subcommand_from init doctor sync status check promote switchover rejoin health-server schedule completions man agent help" -f -a "man" -d 'Write the man pages into a directory'
complete -c hasync -n "__fish_hasync_using_subcommand help; and not __fish_seen_subcommand_from init doctor sync status check promote switchover rejoin health-server schedule completions man agent help" -f -a "agent" -d 'The remote side of a replication, started by hasync over SSH'
complete -c hasync -n "__fish_hasync_using_subcommand help; and not __fish_seen_subcommand_from init doctor sync status check promote switchover rejoin health-server schedule completions man agent help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
