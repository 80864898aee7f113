package Test::Nginx;

# Independent stand-in for the part of nginx-tests' Test::Nginx interface that
# the sni_guard suite uses; selected with `prove -I t/lib/fallback t/`.  It is
# written from a description of the behaviour only, so that the suite runs
# where the nginx-tests repository cannot be installed.

use v5.36;

use Exporter qw(import);
use File::Path qw(rmtree);
use File::Spec;
use File::Temp qw(tempdir);
use IO::Socket::INET;
use POSIX qw(WNOHANG);
use Scalar::Util qw(refaddr weaken);
use Test::More ();

our $VERSION = '0.01';

our @EXPORT = qw(http http_get http_head port log_in log_out);
our @EXPORT_OK = qw(http_start http_end http_content);

# Timeouts, in seconds; every wait loop below is bounded by one of them.
use constant {
    START_WAIT  => 5,
    STOP_WAIT   => 90,
    DAEMON_WAIT => 5,
    POLL_WAIT   => 5,
    IO_TIMEOUT  => 8,
    POLL        => 0.1,
    LOG_LIMIT   => 2048,
    PORT_TRIES  => 10,
    PORT_BLOCK  => 500,
};

# HTTP modules that nginx builds unless configure says --without-http_X_module.
my %HTTP_DEFAULT = map { $_ => 1 } qw(
    access auth_basic autoindex browser charset empty_gif fastcgi geo grpc
    gzip limit_conn limit_req map memcached mirror proxy referer rewrite scgi
    split_clients ssi upstream_hash upstream_ip_hash upstream_keepalive
    upstream_least_conn upstream_random upstream_zone userid uwsgi
);

# Stream modules that come with --with-stream unless switched off.
my %STREAM_DEFAULT = map { $_ => 1 } qw(
    stream_access stream_geo stream_limit_conn stream_map stream_pass
    stream_return stream_set stream_split_clients stream_upstream_hash
    stream_upstream_least_conn stream_upstream_random stream_upstream_zone
);

# Mail modules that come with --with-mail unless switched off.
my %MAIL_DEFAULT = map { $_ => 1 } qw(mail_pop3 mail_imap mail_smtp);

# Directives implemented by a module whose name differs from the feature.
my %ALIAS = (return => 'rewrite');

# Symbolic port => { port => real port, lock => socket kept bound }, per
# protocol, for the whole test file.
my %PORTS;

# Harness objects still alive, weakly held, so that the END block below can
# finish those that a named sub keeps alive until global destruction, when
# Test::More can no longer record the two closing checks.
my %LIVE;

sub new ($class) {
    my $binary = defined $ENV{TEST_NGINX_BINARY}
        ? $ENV{TEST_NGINX_BINARY}
        : '../nginx/objs/nginx';

    my $self = bless {
        _binary   => $binary,
        _pid      => $$,
        _daemons  => [],
        _plan     => 0,
        _globals  => 0,
        _todo     => 0,
    }, $class;

    Test::More::BAIL_OUT("no $binary binary found") unless -f $binary && -x _;

    $self->{_testdir} = tempdir('nginx-test-XXXXXXXXXX', TMPDIR => 1)
        or die "Can't create temp directory: $!\n";

    weaken($LIVE{refaddr $self} = $self);
    return $self;
}

sub testdir ($self) {
    return $self->{_testdir};
}

### Feature detection

sub _version_output ($self) {
    return $self->{_version} if defined $self->{_version};

    my $out = _capture($self->{_binary}, '-V');
    $self->{_version} = defined $out ? $out : '';
    return $self->{_version};
}

sub has ($self, @features) {
    for my $feature (@features) {
        Test::More::plan(skip_all => "no $feature available")
            unless $self->has_module($feature);
    }
    return $self;
}

sub has_module ($self, $feature) {
    my $v = $self->_version_output();
    my $name = exists $ALIAS{$feature} ? $ALIAS{$feature} : $feature;

    return _can_load('IO::Socket::SSL') if $name eq 'socket_ssl';
    return _can_load('IO::Socket::SSL') && IO::Socket::SSL->can_client_sni()
        if $name eq 'socket_ssl_sni';
    return _can_load('IO::Socket::SSL') && IO::Socket::SSL->can_alpn()
        if $name eq 'socket_ssl_alpn';

    return $v =~ /TLS SNI support enabled/ ? 1 : 0 if $name eq 'sni';
    return _openssl_at_least($v, $1) if $name =~ /^openssl:([\d.]+)$/;

    my $http = $v !~ /--without-http(?:\s|$)/;
    my $stream = $v =~ /--with-stream(?:\s|$)/;
    my $mail = $v =~ /--with-mail(?:\s|$)/;

    return $http ? 1 : 0 if $name eq 'http';
    return $stream ? 1 : 0 if $name eq 'stream';
    return $mail ? 1 : 0 if $name eq 'mail';
    return $http && $v !~ /--without-http-cache(?:\s|$)/ ? 1 : 0 if $name eq 'cache';
    return $v !~ /--without-pcre(?:\s|$)/ ? 1 : 0 if $name eq 'pcre';

    # Built in when configure listed it; a "=dynamic" build needs load_module
    # and is not detected here, as in the absence of TEST_NGINX_GLOBALS.
    my $q = quotemeta $name;
    return 1 if $v =~ /--with-(?:http_)?${q}_module(?:\s|$)/;
    return 1 if $v =~ /--with-$q(?:\s|$)/;

    return $http && $v !~ /--without-http_${q}_module(?:\s|$)/ ? 1 : 0
        if $HTTP_DEFAULT{$name};
    return $stream && $v !~ /--without-${q}_module(?:\s|$)/ ? 1 : 0
        if $STREAM_DEFAULT{$name};
    return $mail && $v !~ /--without-${q}_module(?:\s|$)/ ? 1 : 0
        if $MAIL_DEFAULT{$name};

    return 0;
}

sub has_version ($self, $wanted) {
    my ($have) = $self->_version_output() =~ m{nginx version: nginx/([\d.]+)};
    return 0 unless defined $have;
    return _version_cmp($have, $wanted) >= 0 ? 1 : 0;
}

sub has_daemon ($self, $program) {
    Test::More::plan(skip_all => "$program not found")
        unless _in_path($program);
    return $self;
}

sub plan ($self, $count) {
    Test::More::plan(tests => $count + 2);
    $self->{_plan} = 1;
    return $self;
}

sub todo_alerts ($self) {
    $self->{_todo} = 1;
    return $self;
}

### Files

sub _path ($self, $name) {
    return File::Spec->file_name_is_absolute($name)
        ? $name
        : "$self->{_testdir}/$name";
}

sub write_file ($self, $name, $content) {
    my $path = $self->_path($name);
    open my $fh, '>', $path or die "Can't create $path: $!\n";
    binmode $fh;
    print {$fh} $content;
    close $fh or die "Can't write $path: $!\n";
    return $self;
}

sub read_file ($self, $name) {
    my $path = $self->_path($name);
    open my $fh, '<', $path or die "Can't open $path: $!\n";
    binmode $fh;
    local $/;
    my $content = <$fh>;
    close $fh;
    return defined $content ? $content : '';
}

sub write_file_expand ($self, $name, $content) {
    my $d = $self->{_testdir};

    if ($content =~ /%%TEST_GLOBALS%%/) {
        # nginx refuses a second pid directive, so run() must not add -g.
        $self->{_globals} = 1;
        $content =~ s/%%TEST_GLOBALS%%/$self->_globals_main()/ge;
    }
    $content =~ s/%%TEST_GLOBALS_HTTP%%/$self->_globals_http()/ge;
    $content =~ s/%%TEST_GLOBALS_STREAM%%/_env('TEST_NGINX_GLOBALS_STREAM')/ge;
    $content =~ s/%%TESTDIR%%/$d/g;

    $content =~ s/127\.0\.0\.1:(8\d\d\d)(?!\d)/'127.0.0.1:' . port($1)/ge;
    $content =~ s/%%PORT_(\d+)(_UDP)?%%/port($1, udp => defined $2 ? 1 : 0)/ge;

    return $self->write_file($name, $content);
}

sub _globals_main ($self) {
    my $d = $self->{_testdir};
    return "pid $d/nginx.pid;\nerror_log $d/error.log debug;\n"
        . _env('TEST_NGINX_GLOBALS');
}

sub _globals_http ($self) {
    my $d = $self->{_testdir};
    my $s = "root $d;\naccess_log $d/access.log;\n"
        . "client_body_temp_path $d/client_body_temp;\n";

    for my $m (qw(proxy fastcgi uwsgi scgi)) {
        $s .= "${m}_temp_path $d/${m}_temp;\n" if $self->has_module($m);
    }

    return $s . _env('TEST_NGINX_GLOBALS_HTTP');
}

### Ports

sub port ($num, %opts) {
    my $proto = $opts{udp} ? 'udp' : 'tcp';
    my $slot = $PORTS{$proto}{$num} ||= _reserve_port($num, $proto);
    return $opts{socket} ? $slot->{lock} : $slot->{port};
}

sub _reserve_port ($num, $proto) {
    my $base = $num - $num % PORT_BLOCK;
    my %taken = map { $_->{port} => 1 }
        grep { defined } map { values %$_ } values %PORTS;

    for my $try (1 .. PORT_TRIES) {
        my $port = $try == 1 ? $num : $base + int(rand(PORT_BLOCK));
        next if $taken{$port} || $port < 1 || $port > 65535;

        # The port must be free for both protocols.  The one the test does
        # not use stays bound, so a parallel test file that wants the same
        # port fails its own check and picks another.  SO_REUSEADDR lets a
        # TCP port in TIME_WAIT pass the check, but never one that is
        # listening or held as a lock (those are bound without it).
        my $tcp = IO::Socket::INET->new(
            Proto => 'tcp', LocalAddr => "127.0.0.1:$port",
            ReuseAddr => $proto eq 'tcp' ? 1 : 0,
        ) or next;
        my $udp = IO::Socket::INET->new(
            Proto => 'udp', LocalAddr => "127.0.0.1:$port",
        ) or next;

        return { port => $port, lock => $proto eq 'tcp' ? $udp : $tcp };
    }

    die "Port limit exceeded\n";
}

### nginx process

sub _nginx_args ($self) {
    my $d = $self->{_testdir};
    my @args = ('-p', "$d/", '-c', 'nginx.conf', '-e', 'error.log');
    push @args, '-g', "pid $d/nginx.pid; error_log $d/error.log debug;"
        unless $self->{_globals};
    return @args;
}

sub run ($self, %opts) {
    return $self if $self->{_started};

    # A pid file left by a killed nginx would pass for a started one.
    my $pidfile = "$self->{_testdir}/nginx.pid";
    unlink $pidfile;

    my $pid = fork();
    die "Can't fork: $!\n" unless defined $pid;

    if ($pid == 0) {
        if ($opts{quiet}) {
            open STDOUT, '>', File::Spec->devnull;
            open STDERR, '>', File::Spec->devnull;
        }
        no warnings qw(exec);    # the exit below runs only if exec fails
        exec { $self->{_binary} } $self->{_binary}, $self->_nginx_args();
        POSIX::_exit(127);
    }

    $self->{_child} = $pid;

    for (1 .. START_WAIT / POLL) {
        if (waitpid($pid, WNOHANG) == $pid) {
            delete $self->{_child};
            die "Can't start nginx\n";
        }
        if (-s $pidfile) {
            $self->{_started} = 1;
            return $self;
        }
        _pause(POLL);
    }

    # Still running but never wrote its pid file: let stop() reap it.
    $self->{_started} = 1;
    die "Can't start nginx\n";
}

sub try_run ($self, $message) {
    my $verbose = $ENV{TEST_NGINX_VERBOSE};

    eval { $self->run(quiet => !$verbose); 1 } and return $self;

    if ($verbose) {
        _comment('# ', $self->_error_log());
    }
    $self->stop();
    Test::More::plan(skip_all => $message);
    return $self;
}

sub _master_pid ($self) {
    my $pidfile = "$self->{_testdir}/nginx.pid";
    if (open my $fh, '<', $pidfile) {
        my $line = <$fh>;
        close $fh;
        return $1 if defined $line && $line =~ /^\s*(\d+)/;
    }
    return $self->{_child};
}

sub reload ($self) {
    return $self unless $self->{_started};
    my $pid = $self->_master_pid();
    kill 'HUP', $pid if $pid;
    return $self;
}

sub stop ($self) {
    return $self unless $self->{_started};

    my $pid = $self->_master_pid();
    my $child = $self->{_child};
    kill 'QUIT', $pid if $pid;

    if (defined $child) {
        unless (_reap($child, STOP_WAIT)) {
            kill 'TERM', $child;
            unless (_reap($child, DAEMON_WAIT)) {
                kill 'KILL', $child;
                _reap($child, DAEMON_WAIT);
            }
        }
    }

    delete $self->{_child};
    $self->{_started} = 0;
    return $self;
}

sub dump_config ($self) {
    my $out = _capture($self->{_binary}, '-T', $self->_nginx_args());
    return defined $out ? $out : '';
}

### Helper daemons

sub run_daemon ($self, $code, @args) {
    my $pid = fork();
    die "Can't fork: $!\n" unless defined $pid;

    if ($pid == 0) {
        if (ref $code eq 'CODE') {
            $code->(@args);
            STDOUT->flush();
            STDERR->flush();
            # Skip END blocks and destructors inherited from the test.
            POSIX::_exit(0);
        }
        no warnings qw(exec);    # the exit below runs only if exec fails
        exec { $code } $code, @args;
        POSIX::_exit(127);
    }

    push @{$self->{_daemons}}, $pid;
    return $self;
}

sub stop_daemons ($self) {
    my @pids = @{$self->{_daemons}};
    return $self unless @pids;

    kill 'TERM', @pids;
    my @left = _reap_all(DAEMON_WAIT, @pids);
    if (@left) {
        kill 'TERM', @left;
        @left = _reap_all(DAEMON_WAIT, @left);
    }
    if (@left) {
        kill 'KILL', @left;
        _reap_all(DAEMON_WAIT, @left);
    }

    $self->{_daemons} = [];
    return $self;
}

sub waitforsocket ($self, $peer) {
    for (1 .. POLL_WAIT / POLL) {
        my $s = IO::Socket::INET->new(Proto => 'tcp', PeerAddr => $peer);
        if ($s) {
            close $s;
            return 1;
        }
        _pause(POLL);
    }
    return undef;
}

sub waitforfile ($self, $file, $pid = undef) {
    for (1 .. POLL_WAIT / POLL) {
        return 1 if -e $file;
        return undef if defined $pid && !kill(0, $pid);
        _pause(POLL);
    }
    return undef;
}

### Teardown

sub _error_log ($self) {
    my $path = "$self->{_testdir}/error.log";
    return '' unless -f $path;
    return eval { $self->read_file('error.log') } // '';
}

# Runs before Test::More's own END block, which was compiled earlier.
END {
    for my $self (grep { defined } values %LIVE) {
        $self->_finish();
    }
}

sub DESTROY ($self) {
    delete $LIVE{refaddr $self};
    $self->_finish();
}

sub _finish ($self) {
    return unless defined $self->{_pid} && $$ == $self->{_pid};
    return if $self->{_finished}++;
    local ($?, $@, $!);

    $self->stop();
    $self->stop_daemons();

    if ($self->{_plan}) {
        my @log = split /\n/, $self->_error_log();
        my $tb = Test::More->builder;

        $tb->todo_start('alerts') if $self->{_todo};
        Test::More::is(join("\n", grep { /\[alert\]/ } @log), '', 'no alerts');
        $tb->todo_end() if $self->{_todo};

        Test::More::is(join("\n", grep { /Sanitizer/ } @log), '',
            'no sanitizer errors');
    }

    if ($ENV{TEST_NGINX_CATLOG}) {
        _comment('# ', $self->_error_log());
    }

    rmtree($self->{_testdir}) unless $ENV{TEST_NGINX_LEAVE};
}

### HTTP client

sub http_get ($uri, %extra) {
    return http("GET $uri HTTP/1.0\r\nHost: localhost\r\n\r\n", %extra);
}

sub http_head ($uri, %extra) {
    return http("HEAD $uri HTTP/1.0\r\nHost: localhost\r\n\r\n", %extra);
}

sub http ($request, %extra) {
    my $s = http_start($request, %extra);
    return $s if !defined $s || !ref $s || $extra{start};
    return http_end($s);
}

sub http_start ($request, %extra) {
    my $s;

    my $ok = eval {
        local $SIG{ALRM} = sub { die "timeout\n" };
        local $SIG{PIPE} = sub { die "sigpipe\n" };
        alarm(IO_TIMEOUT);

        # Only reserve the default port when the caller did not pick a peer.
        my $peer = $extra{PeerAddr}
            // '127.0.0.1:' . port($extra{SSL} ? 8443 : 8080);
        $s = $extra{socket} || IO::Socket::INET->new(
            Proto    => 'tcp',
            PeerAddr => $peer,
            %extra,
        ) or die "Can't connect to nginx: $!\n";

        if ($extra{SSL}) {
            require IO::Socket::SSL;
            no warnings qw(once);    # SSL_ERROR is set by IO::Socket::SSL
            IO::Socket::SSL->start_SSL(
                $s,
                SSL_verify_mode => IO::Socket::SSL::SSL_VERIFY_NONE(),
                %extra,
            ) or die "$IO::Socket::SSL::SSL_ERROR\n";
        }

        log_out($request);
        $s->print($request);

        _pause($extra{sleep}) if $extra{sleep};

        if (!$extra{aborted} && defined $extra{body}) {
            log_out($extra{body});
            $s->print($extra{body});
        }

        alarm(0);
        1;
    };
    alarm(0);

    unless ($ok) {
        log_in("died: $@");
        return undef;
    }

    return '' if $extra{aborted};
    return $s;
}

sub http_end ($s, %extra) {
    my $reply = '';

    my $ok = eval {
        local $SIG{ALRM} = sub { die "timeout\n" };
        local $SIG{PIPE} = sub { die "sigpipe\n" };
        alarm(IO_TIMEOUT);

        while (1) {
            my $n = $s->sysread($reply, 16384, length $reply);
            last unless $n;
        }

        alarm(0);
        1;
    };
    alarm(0);

    unless ($ok) {
        log_in("died: $@");
        return undef;
    }

    log_in($reply);
    return $reply;
}

sub http_content ($reply) {
    return undef unless defined $reply;

    my ($headers, $body) = split /\x0d?\x0a\x0d?\x0a/, $reply, 2;
    return undef unless defined $body;

    return $body unless $headers =~ /^Transfer-Encoding:\s*chunked\s*$/mi;

    my $content = '';
    while ($body =~ s/\A([0-9a-fA-F]+)[^\x0d\x0a]*\x0d?\x0a//) {
        my $size = hex $1;
        return $content if $size == 0;
        last if length $body < $size;
        $content .= substr $body, 0, $size, '';
        $body =~ s/\A\x0d?\x0a//;
    }

    return $content . '[no-last-chunk]';
}

### Logging

sub log_out ($msg) {
    _log_traffic('# >> ', $msg);
}

sub log_in ($msg) {
    _log_traffic('# << ', $msg);
}

sub _log_traffic ($prefix, $msg) {
    return unless $ENV{TEST_NGINX_VERBOSE};
    $msg = '' unless defined $msg;

    my $total = length $msg;
    if ($total > LOG_LIMIT) {
        $msg = substr($msg, 0, LOG_LIMIT) . "(...logged only "
            . LOG_LIMIT . " of $total bytes)";
    }

    $msg =~ s/([^\x20-\x7e\x0a])/sprintf('\\x%02x', ord $1)/ge;
    _comment($prefix, $msg);
}

sub _comment ($prefix, $text) {
    print STDERR map { "$prefix$_\n" } split /\n/, $text;
}

### Small utilities

sub _env ($name) {
    return defined $ENV{$name} ? $ENV{$name} : '';
}

sub _can_load ($module) {
    return eval "require $module; 1" ? 1 : 0;
}

sub _pause ($seconds) {
    select(undef, undef, undef, $seconds);
}

sub _reap ($pid, $timeout) {
    for (0 .. $timeout / POLL) {
        my $r = waitpid($pid, WNOHANG);
        return 1 if $r == $pid || $r == -1;
        _pause(POLL);
    }
    return 0;
}

sub _reap_all ($timeout, @pids) {
    my %left = map { $_ => 1 } @pids;
    for (0 .. $timeout / POLL) {
        for my $pid (keys %left) {
            my $r = waitpid($pid, WNOHANG);
            delete $left{$pid} if $r == $pid || $r == -1;
        }
        last unless %left;
        _pause(POLL);
    }
    return keys %left;
}

sub _capture ($program, @args) {
    my $pid = open(my $fh, '-|') // return undef;
    if ($pid == 0) {
        open STDERR, '>&', \*STDOUT;
        no warnings qw(exec);    # the exit below runs only if exec fails
        exec { $program } $program, @args;
        POSIX::_exit(127);
    }
    local $/;
    my $out = <$fh>;
    close $fh;
    return $out;
}

sub _in_path ($program) {
    return -x $program ? 1 : 0 if $program =~ m{/};
    for my $dir (File::Spec->path()) {
        return 1 if -f "$dir/$program" && -x _;
    }
    return 0;
}

sub _version_cmp ($have, $want) {
    my @have = split /\./, $have;
    my @want = split /\./, $want;
    while (@have || @want) {
        my $x = shift(@have) // 0;
        my $y = shift(@want) // 0;
        return $x <=> $y if $x != $y;
    }
    return 0;
}

sub _openssl_at_least ($v, $wanted) {
    my ($have) = $v =~ /built with OpenSSL ([\d.]+)/;
    return 0 unless defined $have;
    return _version_cmp($have, $wanted) >= 0 ? 1 : 0;
}

1;
