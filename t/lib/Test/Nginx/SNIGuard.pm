package Test::Nginx::SNIGuard;

# Test tools for the sni_guard integration tests: a raw TLS ClientHello probe,
# a full TLS client with session resumption, and a scriptable HTTP (or HTTPS)
# lookup service on loopback.  Documentation is in the POD at the end.

use v5.36;

use Carp qw(croak);
use Errno qw(EINTR EAGAIN EWOULDBLOCK);
use Exporter qw(import);
use Fcntl qw(O_WRONLY O_APPEND O_CREAT);
use IO::Select;
use IO::Socket::INET;
use POSIX qw(WNOHANG);
use Socket qw(SOL_SOCKET SO_LINGER);
use Time::HiRes ();

our $VERSION = '0.01';

our @EXPORT_OK = qw(
    sni_ext client_hello alert_name tls_get
    lookup_daemon lookup_conf lookups lookup_count lookup_log lookup_conns lookup_clear
    make_cert wait_for pid_in children
);
our %EXPORT_TAGS = (all => \@EXPORT_OK);

use constant {
    LOOPBACK => '127.0.0.1',

    # TLS wire constants
    REC_ALERT     => 21,
    REC_HANDSHAKE => 22,
    REC_VERSION   => 0x0301,    # what real clients put in the first record
    HELLO_VERSION => 0x0303,
    MAX_FRAGMENT  => 16384,     # a record may carry at most 2^14 plaintext bytes
    MAX_U16       => 0xffff,

    DEFAULT_TIMEOUT => 5,

    # lookup service bounds; every wait in the daemon is limited by one of these
    IDLE_TIMEOUT  => 10,
    HANG_LIMIT    => 30,
    ENDLESS_TIME  => 30,
    ENDLESS_BYTES => 50 * 1024 * 1024,
    WRITE_TIMEOUT => 10,
    TLS_HANDSHAKE => 5,
    STOP_WAIT     => 3,
    ACCEPT_POLL   => 0.2,
    MAX_HEAD      => 64 * 1024,
    MAX_BODY      => 1024 * 1024,
    REDIRECT_TO   => 'http://127.0.0.1:1/',
};

# TLS 1.3 suites first, then two TLS 1.2 ECDHE suites so a 1.2-only server also answers.
my @CIPHER_SUITES = (0x1301, 0x1302, 0x1303, 0xc02f, 0xc02b);
my @GROUPS        = (0x001d, 0x0017);                            # x25519, secp256r1
my @SIG_ALGS      = (0x0804, 0x0401, 0x0403, 0x0805, 0x0501);
my @VERSIONS      = (0x0304, 0x0303);

my %ALERT_NAME = (
    0   => 'close_notify',            10  => 'unexpected_message',
    20  => 'bad_record_mac',          22  => 'record_overflow',
    40  => 'handshake_failure',       42  => 'bad_certificate',
    43  => 'unsupported_certificate', 44  => 'certificate_revoked',
    45  => 'certificate_expired',     46  => 'certificate_unknown',
    47  => 'illegal_parameter',       48  => 'unknown_ca',
    49  => 'access_denied',           50  => 'decode_error',
    51  => 'decrypt_error',           70  => 'protocol_version',
    71  => 'insufficient_security',   80  => 'internal_error',
    86  => 'inappropriate_fallback',  90  => 'user_canceled',
    109 => 'missing_extension',       110 => 'unsupported_extension',
    112 => 'unrecognized_name',       113 => 'bad_certificate_status_response',
    115 => 'unknown_psk_identity',    116 => 'certificate_required',
    120 => 'no_application_protocol',
);

my %REASON = (
    200 => 'OK',                    201 => 'Created',
    204 => 'No Content',            302 => 'Found',
    304 => 'Not Modified',          400 => 'Bad Request',
    401 => 'Unauthorized',          403 => 'Forbidden',
    404 => 'Not Found',             410 => 'Gone',
    413 => 'Payload Too Large',     429 => 'Too Many Requests',
    500 => 'Internal Server Error', 501 => 'Not Implemented',
    502 => 'Bad Gateway',           503 => 'Service Unavailable',
    504 => 'Gateway Timeout',
);

my %MODE_ARG = (
    normal    => undef,
    status    => qr/^[0-9]{3}$/,
    hang      => undef,
    slow      => qr/^[0-9]{1,5}$/,
    close     => undef,
    partial   => undef,
    malformed => undef,
    endless   => undef,
    redirect  => undef,
    reset     => undef,
);

###############################################################################
# Waiting and processes

# Waits, for at most $secs, until $cond returns true; returns its last value.
sub wait_for ($secs, $cond) {
    my $deadline = Time::HiRes::time() + $secs;
    my $v;
    until (($v = $cond->()) || Time::HiRes::time() > $deadline) {
        Time::HiRes::sleep(0.02);
    }
    return $v;
}

# The pid in a pid file, or undef.
sub pid_in ($file) {
    open my $fh, '<', $file or return undef;
    my $line = <$fh> // '';
    return $line =~ /^(\d+)/ ? $1 : undef;
}

# The live (not zombie) children of a process, from /proc.
sub children ($ppid) {
    my @pids;
    for my $stat (glob '/proc/[0-9]*/stat') {
        open my $fh, '<', $stat or next;
        my $line = <$fh>;
        close $fh;
        # the command name, in parentheses, may hold anything: skip to its end
        my ($state, $parent) = ($line // '') =~ /.*\) (\S) (\d+) /s or next;
        push @pids, $stat =~ m{(\d+)} if $parent == $ppid && $state ne 'Z';
    }
    return @pids;
}

###############################################################################
# Certificates

# Writes "$dir/$name.crt" and "$dir/$name.key": a certificate for $name (also its
# subjectAltName, as clients that ignore the common name require) signed by a
# test CA, "$dir/ca.crt", made on first use.  Returns nothing; dies on failure.
sub make_cert ($dir, $name) {
    my $run = sub ($cmd) {
        system("$cmd >>$dir/openssl.log 2>&1") == 0
            or croak "openssl failed, see $dir/openssl.log: $cmd";
    };

    if (!-e "$dir/ca.crt") {
        $run->("openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=sni-guard-test-ca "
            . "-addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign "
            . "-keyout $dir/ca.key -out $dir/ca.crt");
    }

    _write_atomic("$dir/$name.ext", "subjectAltName=DNS:$name\n"
        . "basicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n");
    $run->("openssl req -newkey rsa:2048 -nodes -subj /CN=$name "
        . "-keyout $dir/$name.key -out $dir/$name.csr");
    $run->("openssl x509 -req -in $dir/$name.csr -CA $dir/ca.crt -CAkey $dir/ca.key "
        . "-CAcreateserial -days 2 -extfile $dir/$name.ext -out $dir/$name.crt");
    return;
}

###############################################################################
# Raw ClientHello probe

sub alert_name ($code) {
    return undef unless defined $code;
    return $ALERT_NAME{$code} // "alert_$code";
}

sub _bytes ($what, $value) {
    croak "$what: undefined" unless defined $value;
    my $copy = "$value";
    utf8::downgrade($copy, 1) or croak "$what: has characters above 0xff, pass encoded bytes";
    return $copy;
}

sub sni_ext ($name) {
    $name = _bytes('sni_ext name', $name);
    # entry = type(1) + length(2) + name, inside a list with its own 2-byte length
    croak 'sni_ext: name longer than ' . (MAX_U16 - 3) . ' bytes cannot be encoded'
        if length($name) > MAX_U16 - 3;
    return pack('n/a*', pack('C n/a*', 0, $name));
}

sub _random_bytes ($n) {
    return pack('C*', map { int rand 256 } 1 .. $n);
}

sub _extension ($type, $body) {
    croak "extension $type: body of " . length($body) . ' bytes exceeds ' . MAX_U16
        if length($body) > MAX_U16;
    return pack('n n/a*', $type, $body);
}

sub _client_hello_records ($server_name) {
    my $exts = '';
    $exts .= _extension(0, $server_name) if defined $server_name;
    $exts .= _extension(10, pack('n/a*', pack('n*', @GROUPS)));
    $exts .= _extension(11, pack('C/a*', "\x00"));
    $exts .= _extension(13, pack('n/a*', pack('n*', @SIG_ALGS)));
    $exts .= _extension(43, pack('C/a*', pack('n*', @VERSIONS)));
    $exts .= _extension(45, pack('C/a*', "\x01"));
    $exts .= _extension(51, pack('n/a*', pack('n n/a*', 0x001d, _random_bytes(32))));

    # The extensions block has a 2-byte length, so everything above must fit in it.
    if (length($exts) > MAX_U16) {
        my $room = MAX_U16 - (length($exts) - length($server_name // ''));
        croak 'client_hello: extensions total ' . length($exts) . ' bytes, more than '
            . MAX_U16 . " (server_name body at most $room)";
    }

    my $body = pack('n a32 C/a* n/a* C/a* n/a*',
        HELLO_VERSION, _random_bytes(32), _random_bytes(32),
        pack('n*', @CIPHER_SUITES), "\x00", $exts);
    my $message = pack('C', 1) . substr(pack('N', length $body), 1) . $body;

    my $records = '';
    for (my $off = 0; $off < length $message; $off += MAX_FRAGMENT) {
        $records .= pack('C n n/a*', REC_HANDSHAKE, REC_VERSION,
            substr($message, $off, MAX_FRAGMENT));
    }
    return $records;
}

sub client_hello ($port, %opts) {
    my $given = grep { exists $opts{$_} } qw(sni ext neither);
    croak 'client_hello: give exactly one of sni, ext, neither' if $given != 1;
    my $timeout = $opts{timeout} // DEFAULT_TIMEOUT;

    my $server_name;
    if (exists $opts{sni}) {
        $server_name = sni_ext($opts{sni});
    } elsif (exists $opts{ext}) {
        $server_name = _bytes('client_hello ext', $opts{ext});
    }
    my $out = ($opts{proxy} // '') . _client_hello_records($server_name);

    my $deadline = Time::HiRes::time() + $timeout;
    my $sock = IO::Socket::INET->new(
        PeerAddr => LOOPBACK, PeerPort => $port, Proto => 'tcp', Timeout => $timeout,
    ) or return { outcome => 'refused', error => "$!", bytes => 0 };
    $sock->blocking(0);

    my %r = (sent => length $out);
    local $SIG{PIPE} = 'IGNORE';

    # The server may alert and close before it has read everything; what it
    # sent is still worth reading, so a write failure only ends the writing.
    my $wrote = _write_all($sock, $out, $deadline);
    $r{write_error} = $wrote->{error} if defined $wrote->{error};

    my $in  = '';
    my $end = _read_first_record($sock, \$in, $deadline);
    $r{error} = $end->{error} if defined $end->{error};
    close $sock;

    $r{bytes} = length $in;
    @r{qw(alert level)} = (undef, undef);
    if (length($in) >= 5) {
        my ($type) = unpack('C', $in);
        $r{record_type} = $type;
        if ($type == REC_ALERT && length($in) >= 7) {
            $r{outcome} = 'alert';
            @r{qw(level alert)} = unpack('x5 C C', $in);
            $r{alert_name} = alert_name($r{alert});
            return \%r;
        }
        if ($type == REC_HANDSHAKE) {
            $r{outcome} = 'handshake';
            $r{handshake_type} = unpack('x5 C', $in) if length($in) >= 6;
            return \%r;
        }
        if ($type != REC_ALERT) {
            $r{outcome} = 'other';
            return \%r;
        }
    }
    $r{outcome} = $end->{timeout} ? 'timeout' : 'closed';
    return \%r;
}

# Reads until the first TLS record is complete, EOF, an error, or the deadline.
sub _read_first_record ($sock, $buf, $deadline) {
    my $sel = IO::Select->new($sock);
    while (1) {
        if (length($$buf) >= 5) {
            my $len = unpack('x3 n', $$buf);
            return {} if length($$buf) >= 5 + $len;
        }
        my $left = $deadline - Time::HiRes::time();
        return { timeout => 1 } if $left <= 0;
        next unless $sel->can_read($left);
        my $n = sysread($sock, $$buf, 65536, length $$buf);
        if (!defined $n) {
            next if $! == EINTR || $! == EAGAIN || $! == EWOULDBLOCK;
            return { error => "$!" };
        }
        return {} if $n == 0;
    }
}

###############################################################################
# Full TLS client

my $session_serial = 0;

sub tls_get ($port, $name, %opts) {
    require IO::Socket::SSL;
    my $timeout = $opts{timeout} // DEFAULT_TIMEOUT;
    my $uri     = $opts{uri} // '/';
    my $host    = (defined $name && length $name) ? $name : '';

    # Resumption goes through a client session cache that lives in an
    # SSL_Context: reusing that context with the same key offers the session.
    my $session = $opts{session};
    if (!$session) {
        my $ctx = IO::Socket::SSL::SSL_Context->new(
            SSL_verify_mode        => IO::Socket::SSL::SSL_VERIFY_NONE(),
            SSL_session_cache_size => 4,
            (defined $opts{version} ? (SSL_version => $opts{version}) : ()),
        ) or return { ok => 0, error => 'context: ' . ($IO::Socket::SSL::SSL_ERROR // '') };
        $session = bless {
            ctx     => $ctx,
            key     => 'sniguard-' . $$ . '-' . ++$session_serial,
            version => $opts{version},
        }, 'Test::Nginx::SNIGuard::Session';
    }

    my $start = Time::HiRes::time();
    my $sock  = IO::Socket::SSL->new(
        PeerAddr        => LOOPBACK,
        PeerPort        => $port,
        Proto           => 'tcp',
        Timeout         => $timeout,
        SSL_hostname    => $host,
        SSL_verify_mode => IO::Socket::SSL::SSL_VERIFY_NONE(),
        SSL_reuse_ctx   => $session->{ctx},
        SSL_session_key => $session->{key},
    );
    if (!$sock) {
        my $err = $IO::Socket::SSL::SSL_ERROR || "$!";
        # IO::Socket::SSL reports a handshake timeout as "SSL wants a read first"
        return { ok => 0, timeout => 1, error => "handshake timed out ($err)" }
            if Time::HiRes::time() - $start >= $timeout * 0.95;
        return { ok => 0, error => "$err" };
    }

    my %r = (
        ok       => 1,
        session  => $session,
        reused   => $sock->get_session_reused() ? 1 : 0,
        protocol => $sock->get_sslversion(),
        cipher   => $sock->get_cipher(),
    );

    my $deadline = Time::HiRes::time() + $timeout;
    local $SIG{PIPE} = 'IGNORE';
    # nginx answers 400 to an empty Host header, so without a name there is none
    my $request = "GET $uri HTTP/1.0\r\n" . (length $host ? "Host: $host\r\n" : '') . "\r\n";
    $sock->blocking(0);
    my $reply = '';
    my $sel   = IO::Select->new($sock);

    my $off = 0;
    while ($off < length $request) {
        my $left = $deadline - Time::HiRes::time();
        if ($left <= 0) { $r{timeout} = 1; last }
        my $n = $sock->syswrite($request, length($request) - $off, $off);
        if (defined $n) { $off += $n; next }
        if ($! == EAGAIN || $! == EWOULDBLOCK || $! == EINTR) {
            _wait_ssl($sock, $sel, $left);
            next;
        }
        $r{read_error} = $IO::Socket::SSL::SSL_ERROR || "$!";
        last;
    }

    # Read to EOF: TLS 1.3 session tickets arrive after the handshake and are
    # only stored in the cache once SSL_read has processed them.
    while (!$r{timeout} && !$r{read_error}) {
        my $left = $deadline - Time::HiRes::time();
        if ($left <= 0) { $r{timeout} = 1; last }
        my $n = $sock->sysread(my $chunk, 16384);
        if (!defined $n) {
            if ($! == EAGAIN || $! == EWOULDBLOCK || $! == EINTR) {
                _wait_ssl($sock, $sel, $left);
                next;
            }
            $r{read_error} = $IO::Socket::SSL::SSL_ERROR || "$!";
            last;
        }
        last if $n == 0;
        $reply .= $chunk;
    }
    $sock->close(SSL_fast_shutdown => 1);

    $r{reply} = $reply;
    if ($reply =~ m{\AHTTP/\d\.\d (\d{3})}) {
        $r{status} = $1 + 0;
    }
    my $sep = index($reply, "\r\n\r\n");
    $r{body} = $sep >= 0 ? substr($reply, $sep + 4) : undef;
    return \%r;
}

sub _wait_ssl ($sock, $sel, $left) {
    return if $sock->pending();
    my $want_write = $IO::Socket::SSL::SSL_ERROR
        && $IO::Socket::SSL::SSL_ERROR == IO::Socket::SSL::SSL_WANT_WRITE();
    if ($want_write) {
        $sel->can_write($left);
    } else {
        $sel->can_read($left);
    }
    return;
}

package Test::Nginx::SNIGuard::Session {
    sub key ($self)     { return $self->{key} }
    sub version ($self) { return $self->{version} }
}

###############################################################################
# Lookup service: files and helpers

sub _conf_path  ($dir) { return "$dir/lookup.conf" }
sub _log_path   ($dir) { return "$dir/lookup.log" }
sub _conns_path ($dir) { return "$dir/lookup.conns" }
sub _tls_path   ($dir) { return "$dir/lookup.tls" }

sub _decode ($s) {
    $s =~ s/%([0-9A-Fa-f]{2})/chr hex $1/ge;
    return $s;
}

sub _encode ($s) {
    $s =~ s/([^\x21-\x7e]|%)/sprintf '%%%02X', ord $1/ge;
    return $s;
}

sub _query_param ($target, $key) {
    my $q = index($target, '?');
    return undef if $q < 0;
    for my $pair (split /&/, substr($target, $q + 1)) {
        my ($k, $v) = split /=/, $pair, 2;
        return _decode($v // '') if _decode($k) eq $key;
    }
    return undef;
}

sub _append ($path, $line) {
    # one write on an O_APPEND descriptor keeps concurrent lines whole
    sysopen(my $fh, $path, O_WRONLY | O_APPEND | O_CREAT, 0644) or return;
    syswrite($fh, $line);
    close $fh;
    return;
}

sub _write_atomic ($path, $text) {
    my $tmp = "$path.tmp.$$";
    open(my $fh, '>', $tmp) or croak "cannot write $tmp: $!";
    print {$fh} $text or croak "cannot write $tmp: $!";
    close $fh or croak "cannot write $tmp: $!";
    rename($tmp, $path) or croak "cannot rename $tmp to $path: $!";
    return;
}

sub _read_lines ($path) {
    open(my $fh, '<', $path) or return ();
    my @lines = <$fh>;
    close $fh;
    chomp @lines;
    return @lines;
}

sub lookup_conf ($dir, %set) {
    my %known = map { $_ => 1 } qw(mode registered status json);
    my @bad = grep { !$known{$_} } sort keys %set;
    croak "lookup_conf: unknown setting(s) @bad" if @bad;

    my $mode = $set{mode} // 'normal';
    my ($word, $arg, $extra) = split ' ', $mode;
    croak "lookup_conf: unknown mode '$mode'" unless defined $word && exists $MODE_ARG{$word};
    my $want = $MODE_ARG{$word};
    croak "lookup_conf: mode '$mode' has a bad argument"
        if defined $extra
        || ($want && !(defined $arg && $arg =~ $want))
        || (!$want && defined $arg);

    my %entry;
    $entry{$_}{status} = 200 for @{$set{registered} // []};
    while (my ($name, $code) = each %{$set{status} // {}}) {
        croak "lookup_conf: bad status '$code' for '$name'" unless $code =~ /^[1-9][0-9]{2}$/;
        $entry{$name}{status} = $code;
    }
    while (my ($name, $json) = each %{$set{json} // {}}) {
        croak "lookup_conf: JSON for '$name' must be one line" if $json =~ /[\r\n]/;
        $entry{$name}{json} = $json;
    }

    my $text = "# written by Test::Nginx::SNIGuard::lookup_conf\nmode $mode\n";
    for my $name (sort keys %entry) {
        my $e = $entry{$name};
        $text .= join(' ', 'name', _encode(_bytes('lookup_conf name', $name)),
            $e->{status} // 200, (defined $e->{json} ? $e->{json} : ())) . "\n";
    }
    _write_atomic(_conf_path($dir), $text);
    return $text;
}

sub lookup_log ($dir) {
    my @out;
    for my $line (_read_lines(_log_path($dir))) {
        my ($time, $pid, $target) = split / /, $line, 3;
        next unless defined $target;
        push @out, {
            time => $time, pid => $pid, target => $target,
            domain => _query_param($target, 'domain'),
        };
    }
    return @out;
}

sub lookups ($dir) {
    return map { $_->{target} } lookup_log($dir);
}

sub lookup_count ($dir, $domain) {
    return scalar grep { defined $_->{domain} && $_->{domain} eq $domain } lookup_log($dir);
}

sub lookup_conns ($dir) {
    return scalar(() = _read_lines(_conns_path($dir)));
}

sub lookup_clear ($dir) {
    for my $path (_log_path($dir), _conns_path($dir)) {
        open(my $fh, '>', $path) or croak "cannot truncate $path: $!";
        close $fh;
    }
    return;
}

# Returns { mode => [word, arg], names => { name => { status, json } } } or
# { error => text } when the file cannot be understood.
sub _read_conf ($dir) {
    my %conf = (mode => ['normal'], names => {});
    open(my $fh, '<', _conf_path($dir)) or return \%conf;
    my $n = 0;
    while (my $line = <$fh>) {
        $n++;
        $line =~ s/\r?\n\z//;
        next if $line =~ /^\s*(?:#|$)/;
        if ($line =~ /^\s*mode\s+(\S+)(?:\s+(\S+))?\s*$/) {
            my ($word, $arg) = ($1, $2);
            return { error => "line $n: unknown mode" } unless exists $MODE_ARG{$word};
            my $want = $MODE_ARG{$word};
            return { error => "line $n: bad mode argument" }
                if ($want && !(defined $arg && $arg =~ $want)) || (!$want && defined $arg);
            $conf{mode} = [$word, $arg];
        } elsif ($line =~ /^\s*name\s+(\S+)(?:\s+([1-9][0-9]{2}))?(?:\s+(\S.*?))?\s*$/) {
            $conf{names}{_decode($1)} = { status => $2 // 200, json => $3 };
        } else {
            return { error => "line $n: not understood" };
        }
    }
    close $fh;
    return \%conf;
}

###############################################################################
# Lookup service: server

sub lookup_daemon ($port, $dir, %opts) {
    my $ok = eval { _serve($port, $dir, _tls_context(%opts)); 1 };
    my $err = $@;
    print STDERR "lookup_daemon: $err" if !$ok;
    # Never return into the forked copy of the test script, nor run its END blocks.
    POSIX::_exit($ok ? 0 : 1);
}

# The server side TLS context for lookup_daemon's tls option, undef without it.
# Made once, before listening, so a bad certificate or key stops the service
# before lookup.pid appears.
sub _tls_context (%opts) {
    my @bad = grep { $_ ne 'tls' } sort keys %opts;
    croak "lookup_daemon: unknown option(s) @bad" if @bad;
    my $tls = $opts{tls} // return undef;
    croak 'lookup_daemon: tls needs { cert => FILE, key => FILE }'
        unless ref $tls eq 'HASH' && defined $tls->{cert} && defined $tls->{key};
    my @extra = grep { $_ ne 'cert' && $_ ne 'key' } sort keys %$tls;
    croak "lookup_daemon: unknown tls setting(s) @extra" if @extra;

    require IO::Socket::SSL;
    return IO::Socket::SSL::SSL_Context->new(
        SSL_server    => 1,
        SSL_cert_file => $tls->{cert},
        SSL_key_file  => $tls->{key},
    ) || die "lookup_daemon: tls: " . ($IO::Socket::SSL::SSL_ERROR // 'no context') . "\n";
}

sub _serve ($port, $dir, $tls) {
    my $watch = getppid();
    my $stop  = 0;
    local $SIG{TERM} = sub { $stop = 1 };
    local $SIG{INT}  = sub { $stop = 1 };
    local $SIG{HUP}  = sub { $stop = 1 };
    local $SIG{PIPE} = 'IGNORE';
    local $SIG{CHLD} = 'DEFAULT';

    unlink "$dir/lookup.pid";
    my $listen = IO::Socket::INET->new(
        LocalAddr => LOOPBACK, LocalPort => $port, Proto => 'tcp',
        Listen => 128, ReuseAddr => 1,
    ) or die "cannot listen on 127.0.0.1:$port: $@\n";
    _write_atomic("$dir/lookup.pid", "$$\n");

    my %kids;
    my $sel     = IO::Select->new($listen);
    my $blocked = POSIX::SigSet->new(POSIX::SIGTERM(), POSIX::SIGINT(), POSIX::SIGHUP());
    while (!$stop) {
        while ((my $pid = waitpid(-1, WNOHANG)) > 0) { delete $kids{$pid} }
        # An orphaned service would outlive the test run.
        last if getppid() != $watch;
        next unless $sel->can_read(ACCEPT_POLL);
        my $client = $listen->accept() or next;

        # A stop signal between fork and the child's reset must not be lost
        # in the child, so it stays blocked until each side is ready.
        my $old = POSIX::SigSet->new();
        POSIX::sigprocmask(POSIX::SIG_BLOCK(), $blocked, $old);
        my $pid = fork();
        if (defined $pid && $pid == 0) {
            $SIG{$_} = 'DEFAULT' for qw(TERM INT HUP);
            POSIX::sigprocmask(POSIX::SIG_SETMASK(), $old);
            close $listen;
            eval { _connection($client, $dir, $tls); 1 } or print STDERR "lookup_daemon: $@";
            POSIX::_exit(0);
        }
        POSIX::sigprocmask(POSIX::SIG_SETMASK(), $old);
        $kids{$pid} = 1 if defined $pid;
        close $client;
    }

    close $listen;
    _stop_kids(\%kids);
    unlink "$dir/lookup.pid";
    return;
}

sub _stop_kids ($kids) {
    for my $sig (qw(TERM KILL)) {
        kill $sig, keys %$kids if %$kids;
        my $deadline = Time::HiRes::time() + STOP_WAIT;
        while (%$kids && Time::HiRes::time() < $deadline) {
            for my $pid (keys %$kids) {
                delete $kids->{$pid} if waitpid($pid, WNOHANG) != 0;
            }
            Time::HiRes::sleep(0.02) if %$kids;
        }
        last unless %$kids;
    }
    return;
}

sub _connection ($sock, $dir, $tls) {
    $sock->blocking(0);
    _append(_conns_path($dir),
        sprintf("%.3f %d %d\n", Time::HiRes::time(), $$, $sock->peerport() // 0));

    if ($tls) {
        my $error = _tls_accept($sock, $tls);
        if (defined $error) {
            $error =~ s/\s+/ /g;
            $error =~ s/ \z//;
            _append(_tls_path($dir), sprintf("%.3f %d %s\n", Time::HiRes::time(), $$, $error));
            return;
        }
    }

    my $abort = _serve_requests($sock, $dir);
    # Over TLS an orderly close is a close_notify before the FIN; a reset must
    # stay a bare RST, so the socket is left to the process exit then.
    $sock->close(SSL_fast_shutdown => 1) if $tls && !$abort;
    return;
}

# Upgrades an accepted connection in place; undef on success, else why not.
sub _tls_accept ($sock, $ctx) {
    IO::Socket::SSL->start_SSL($sock,
        SSL_server => 1, SSL_reuse_ctx => $ctx, SSL_startHandshake => 0,
    ) or return 'start: ' . ($IO::Socket::SSL::SSL_ERROR // 'failed');
    $sock->blocking(0);
    my $sel      = IO::Select->new($sock);
    my $deadline = Time::HiRes::time() + TLS_HANDSHAKE;
    while (1) {
        return undef if $sock->accept_SSL();
        my $err = $IO::Socket::SSL::SSL_ERROR;
        my $left = $deadline - Time::HiRes::time();
        return 'handshake timed out' if $left <= 0;
        if ($err && $err == IO::Socket::SSL::SSL_WANT_READ()) {
            $sel->can_read($left);
        } elsif ($err && $err == IO::Socket::SSL::SSL_WANT_WRITE()) {
            $sel->can_write($left);
        } else {
            return 'handshake failed: ' . ($err || $! || 'unknown');
        }
    }
}

# Serves requests until the connection ends; true when it ended with a reset.
sub _serve_requests ($sock, $dir) {
    my $buf = '';
    while (1) {
        my $req = _read_request($sock, \$buf) or return 0;
        if ($req->{error}) {
            _respond($sock, 400, [], "$req->{error}\n", { keep => 0 });
            return 0;
        }
        _append(_log_path($dir),
            sprintf("%.3f %d %s\n", Time::HiRes::time(), $$, $req->{target}));
        my $keep = _answer($sock, $req, _read_conf($dir));
        return 1 if $req->{reset};
        return 0 unless $keep;
    }
}

# One request: undef on EOF, idle timeout or read error; { error } when it
# cannot be served; otherwise { method, target, minor, keep }.
sub _read_request ($sock, $buf) {
    my $sel      = IO::Select->new($sock);
    my $deadline = Time::HiRes::time() + IDLE_TIMEOUT;
    my $end;
    while (($end = index($$buf, "\r\n\r\n")) < 0) {
        return { error => 'request head too large' } if length($$buf) > MAX_HEAD;
        _read_more($sock, $sel, $buf, $deadline) or return undef;
    }
    my $head = substr($$buf, 0, $end);
    substr($$buf, 0, $end + 4, '');

    my ($line, @fields) = split /\r\n/, $head;
    my ($method, $target, $minor) = ($line // '') =~ m{^([A-Z]+) (\S+) HTTP/1\.([01])$}
        or return { error => 'bad request line' };
    my %h;
    for my $f (@fields) {
        my ($k, $v) = $f =~ /^([^:\s]+):\s*(.*?)\s*$/ or return { error => 'bad header line' };
        $h{lc $k} = exists $h{lc $k} ? "$h{lc $k}, $v" : $v;
    }
    return { error => 'request bodies must use content-length' } if exists $h{'transfer-encoding'};

    my $length = $h{'content-length'} // 0;
    return { error => 'bad content-length' } if $length !~ /^[0-9]+$/ || $length > MAX_BODY;
    while (length($$buf) < $length) {
        _read_more($sock, $sel, $buf, $deadline) or return undef;
    }
    substr($$buf, 0, $length, '');

    my %tokens = map { lc($_) => 1 } split /\s*,\s*/, $h{connection} // '';
    my $keep   = $minor ? !$tokens{close} : !!$tokens{'keep-alive'};
    return {
        method => $method, target => $target, minor => $minor, keep => $keep,
        keep_header => !$minor && $keep,
    };
}

sub _read_more ($sock, $sel, $buf, $deadline) {
    while (1) {
        my $left = $deadline - Time::HiRes::time();
        return 0 if $left <= 0;
        # TLS may already hold decrypted bytes that select() cannot see.
        next unless _pending($sock) || $sel->can_read($left);
        my $n = sysread($sock, $$buf, 16384, length $$buf);
        return 1 if $n;
        return 0 if defined $n;
        next if $! == EINTR || $! == EAGAIN || $! == EWOULDBLOCK;
        return 0;
    }
}

sub _pending ($sock) {
    return $sock->can('pending') && $sock->pending() ? 1 : 0;
}

# Writes everything or gives up at the deadline; { error } or { timeout } on failure.
sub _write_all ($sock, $data, $deadline) {
    my $sel = IO::Select->new($sock);
    my $off = 0;
    while ($off < length $data) {
        my $left = $deadline - Time::HiRes::time();
        return { timeout => 1, written => $off } if $left <= 0;
        next unless $sel->can_write($left);
        my $n = syswrite($sock, $data, length($data) - $off, $off);
        if (!defined $n) {
            next if $! == EINTR || $! == EAGAIN || $! == EWOULDBLOCK;
            return { error => "$!", written => $off };
        }
        $off += $n;
    }
    return { written => $off };
}

sub _send ($sock, $data) {
    my $r = _write_all($sock, $data, Time::HiRes::time() + WRITE_TIMEOUT);
    return !defined $r->{error} && !$r->{timeout};
}

sub _respond ($sock, $status, $headers, $body, $req) {
    my $head = "HTTP/1.1 $status " . ($REASON{$status} // 'Status') . "\r\n"
        . "Server: sniguard-lookup\r\n";
    $head .= "$_\r\n" for @$headers;
    my $no_body = $status < 200 || $status == 204 || $status == 304;
    $head .= 'Content-Length: ' . length($body) . "\r\n" unless $no_body;
    $head .= "Connection: close\r\n"      unless $req->{keep};
    $head .= "Connection: keep-alive\r\n" if $req->{keep_header};
    my $with_body = !$no_body && ($req->{method} // 'GET') ne 'HEAD';
    return _send($sock, $head . "\r\n" . ($with_body ? $body : ''));
}

# Serves one request per the configuration; true when the connection stays open.
sub _answer ($sock, $req, $conf) {
    if ($conf->{error}) {
        _respond($sock, 500, [], "lookup.conf $conf->{error}\n", $req);
        return $req->{keep};
    }
    my ($mode, $arg) = @{$conf->{mode}};

    if ($mode eq 'hang') {
        _hang($sock);
        return 0;
    }
    if ($mode eq 'close') {
        return 0;
    }
    if ($mode eq 'reset') {
        setsockopt($sock, SOL_SOCKET, SO_LINGER, pack('ii', 1, 0));
        $req->{reset} = 1;
        return 0;
    }
    if ($mode eq 'partial') {
        _send($sock, "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
            . "Content-Length: 100\r\n\r\n0123456789");
        return 0;
    }
    if ($mode eq 'malformed') {
        _send($sock, "HTTP/1.1 OK-ish\r\n\r\n");
        return 0;
    }
    if ($mode eq 'endless') {
        _endless($sock);
        return 0;
    }
    if ($mode eq 'redirect') {
        _respond($sock, 302, ['Location: ' . REDIRECT_TO], '', $req) or return 0;
        return $req->{keep};
    }
    if ($mode eq 'status') {
        _respond($sock, $arg, ['Content-Type: text/plain'], "status $arg\n", $req) or return 0;
        return $req->{keep};
    }

    Time::HiRes::sleep($arg / 1000) if $mode eq 'slow';

    my $domain = _query_param($req->{target}, 'domain');
    my ($status, $type, $body);
    if (!defined $domain) {
        ($status, $type, $body) = (400, 'text/plain', "missing domain parameter\n");
    } elsif (my $e = $conf->{names}{$domain}) {
        $status = $e->{status};
        if (defined $e->{json}) {
            ($type, $body) = ('application/json', $e->{json});
        } else {
            ($type, $body) = ('text/plain', $status =~ /^2/ ? 'ok' : "status $status\n");
        }
    } else {
        ($status, $type, $body) = (404, 'text/plain', "not registered\n");
    }
    _respond($sock, $status, ["Content-Type: $type"], $body, $req) or return 0;
    return $req->{keep};
}

sub _hang ($sock) {
    my $sel      = IO::Select->new($sock);
    my $deadline = Time::HiRes::time() + HANG_LIMIT;
    my $junk     = '';
    while (1) {
        # _read_more fails on EOF, error or the deadline; input is discarded
        _read_more($sock, $sel, \$junk, $deadline) or return;
        $junk = '';
    }
}

sub _endless ($sock) {
    my $deadline = Time::HiRes::time() + ENDLESS_TIME;
    _write_all($sock, "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
        . "Connection: close\r\n\r\n", $deadline)->{written} or return;
    my $chunk = ('0123456789abcdef' x 63) . "\n" x 16;    # 1 KiB
    $chunk x= 64;
    my $sent = 0;
    while ($sent < ENDLESS_BYTES) {
        my $r = _write_all($sock, $chunk, $deadline);
        $sent += $r->{written};
        return if defined $r->{error} || $r->{timeout};
    }
    return;
}

1;

__END__

=head1 NAME

Test::Nginx::SNIGuard - TLS probes and a scriptable lookup service for the sni_guard tests

=head1 SYNOPSIS

    use lib 't/lib';
    use Test::Nginx::SNIGuard qw(:all);

    my $dir = $t->testdir();
    lookup_conf($dir, registered => ['a.example'], status => { 'gone.example' => 410 });
    $t->run_daemon(\&Test::Nginx::SNIGuard::lookup_daemon, port(8081), $dir);
    $t->waitforfile("$dir/lookup.pid");

    my $r = client_hello(port(8443), sni => "bad\x00name");
    is($r->{outcome}, 'alert');
    is($r->{alert}, 80);

    my $g = tls_get(port(8443), 'a.example');
    ok($g->{ok});
    my $again = tls_get(port(8443), 'b.example', session => $g->{session});
    is(lookup_count($dir, 'a.example'), 1);

=head1 TLS TOOLS

All connections go to 127.0.0.1.

=head2 sni_ext($name_bytes)

Body of a well-formed server_name extension (type 0) carrying one host_name
entry with the given bytes, whatever they are (NUL, non-ASCII, dots, empty).
Characters above 0xff are refused: encode first.  Names over 65532 bytes
cannot be encoded and croak.

=head2 client_hello($port, %opts)

Sends one hand-built TLS ClientHello and reads the first record of the answer.
Exactly one of:

=over

=item sni => $bytes - a server_name extension built with sni_ext

=item ext => $raw - the server_name extension body sent as-is (malformed cases)

=item neither => 1 - no server_name extension at all

=back

and optionally C<< timeout => $seconds >> (default 5, covers connect, write
and read), and C<< proxy => $header >>, bytes sent before the hello (a PROXY
protocol header for a C<listen ... proxy_protocol> port).

The hello offers TLS 1.3 and 1.2 (suites 0x1301 0x1302 0x1303 0xc02f 0xc02b),
x25519/secp256r1, five RSA/ECDSA signature schemes, psk_dhe_ke and an x25519
key share; it has a 32-byte session id.  Messages over 16384 bytes are split
over several handshake records.  The extensions block has a 2-byte length, so
next to the other extensions (89 bytes) and its own 4-byte header the
server_name extension body can be at most 65442 bytes (a name given as C<sni>
at most 65437); larger croaks.

Returns a hashref:

    outcome        'alert' | 'handshake' | 'closed' | 'timeout'
                   | 'other' (first record neither alert nor handshake)
                   | 'refused' (connect failed, see error)
    alert          alert description number (outcome 'alert'), else undef
    alert_name     e.g. 'internal_error'
    level          1 (warning) or 2 (fatal), else undef
    bytes          bytes received (the first record, or more if they came together)
    record_type    type byte of the first record, when 5 bytes arrived
    handshake_type 2 for a ServerHello (outcome 'handshake')
    sent           bytes of the ClientHello records
    write_error    set when the server stopped reading before all was sent
    error          read error text (e.g. a reset)

=head2 alert_name($number)

RFC 8446 name of an alert description, e.g. 80 -> 'internal_error'.

=head2 tls_get($port, $name, %opts)

Full handshake with IO::Socket::SSL (no certificate verification) with SNI
C<$name> (undef or '' sends none), then C<GET uri HTTP/1.0> with
C<Host: $name> (no Host header without a name), reading to EOF.

Options: C<uri> (default '/'), C<timeout> (default 5, for the handshake and
again for the exchange), C<version> ('TLSv1_2', 'TLSv1_3' or any
IO::Socket::SSL SSL_version string), C<session> (the C<session> of an earlier
result, to resume it).

On success:

    { ok => 1, reply => $raw_reply, status => 200, body => 'hello',
      session => $session, reused => 0|1, protocol => 'TLSv1_3', cipher => ...,
      timeout => 1 (reply not complete in time), read_error => ... }

On a failed handshake: C<< { ok => 0, error => $text } >>, where the text is
OpenSSL's, e.g. "... tlsv1 alert internal error" or "... tlsv1 unrecognized
name".  When the handshake did not finish within the timeout (say the server
waits on a hanging lookup): C<< { ok => 0, timeout => 1, error => 'handshake
timed out (...)' } >>.

Resumption: C<session> is an opaque object holding an IO::Socket::SSL client
context with a session cache and a cache key (the documented SSL_reuse_ctx /
SSL_session_key mechanism).  Every tls_get given a session offers the newest
session or ticket stored under it and stores the new ones, so one object can
chain several resumptions.  A resumed connection uses the context of the first
one: a C<version> given along with C<session> is ignored (the first call's
version stays).  The SNI name may differ from the first connection's; that is
the point - the server must still check it.  Beware that on a TLS 1.2
resumption OpenSSL's SSL_get_servername() on the server returns the name
stored in the session, not the one just sent, so a check made in the
servername callback (nginx's own, e.g. ssl_reject_handshake) does not see the
new name; the self-test shows this.

=head1 WAITING AND PROCESSES

=head2 wait_for($secs, $cond)

Calls C<$cond> every 20 ms until it returns true or C<$secs> pass; returns its last
value.

=head2 pid_in($file)

The pid in a pid file, or undef.

=head2 children($ppid)

The pids of the live (not zombie) children of a process, read from F</proc>.

=head1 CERTIFICATES

=head2 make_cert($dir, $name)

Writes F<$dir/$name.crt> and F<$dir/$name.key>, a certificate for C<$name> with a
matching subjectAltName, signed by a test CA in F<$dir/ca.crt> (made on first
use). Dies if openssl fails; its output is in F<$dir/openssl.log>.

=head1 LOOKUP SERVICE

=head2 lookup_daemon($port, $dir, %opts)

Runs the service on 127.0.0.1:$port in the calling process and never returns
(it ends with POSIX::_exit, so the forked test script's END blocks do not run
twice).  Meant for C<< $t->run_daemon(\&Test::Nginx::SNIGuard::lookup_daemon,
$port, $dir) >> or a forked child.

Option C<< tls => { cert => $crt_file, key => $key_file } >> serves https
instead of http, e.g. with a certificate from make_cert:

    make_cert($dir, 'localhost');
    $t->run_daemon(\&Test::Nginx::SNIGuard::lookup_daemon, port(8082), $dir,
        tls => { cert => "$dir/localhost.crt", key => "$dir/localhost.key" });
    # client side: https://localhost:PORT/... trusting $dir/ca.crt

Each accepted connection is then upgraded with IO::Socket::SSL as a server;
the handshake must finish within 5 s, otherwise, or when it fails (say the
client does not trust the certificate), the connection is closed without
serving anything and the failure is logged in lookup.tls.  After the handshake
everything works as over http: keep-alive, pipelining, modes, logs.  An
orderly close sends close_notify first; mode C<reset> still ends with a bare
TCP RST.  The TLS context is made before listening: a missing or unreadable
certificate or key, or an unknown option, ends the service with exit status 1
and a message on STDERR before lookup.pid is written.

Files in $dir:

=over

=item lookup.conf - behaviour, read again for every request (see below)

=item lookup.log - one line per request received (before it is answered):
C<< <unix time, 3 decimals> <pid> <request target> >>.  The pid is the
connection's process, so distinct pids = distinct connections that carried
requests.

=item lookup.conns - one line per accepted connection:
C<< <unix time> <pid> <client port> >>.  A bare connect (e.g. waitforsocket)
counts here but not in lookup.log.

=item lookup.tls - with the tls option, one line per connection whose TLS
handshake did not complete: C<< <unix time> <pid> <reason> >>, the reason being
C<handshake timed out> or C<handshake failed: ...> with OpenSSL's text (e.g.
"... tlsv1 alert unknown ca" when the client does not trust the certificate).
Such a connection counts in lookup.conns but not in lookup.log.

=item lookup.pid - written once listening (removed on exit): wait for it with
C<< $t->waitforfile("$dir/lookup.pid") >> instead of probing the port.

=back

Lines are written with one write() on an O_APPEND descriptor, so lines from
concurrent connections never mix.

Each connection is served by its own forked process, HTTP/1.1 with keep-alive
(HTTP/1.1 unless C<Connection: close>; HTTP/1.0 only with
C<Connection: keep-alive>), pipelining allowed, idle timeout 10 s.  On TERM,
INT or HUP the parent kills and reaps its connection processes (TERM, then
KILL after 3 s) and exits; it also exits when its parent process goes away.

=head2 lookup.conf format

Line based; blank lines and lines starting with # are ignored.

    mode MODE [ARG]
    name NAME [STATUS] [JSON]

C<name> lines: NAME is compared with the %XX-decoded C<domain> query
parameter, exactly (no case folding, '+' is not a space).  Write any byte
outside 0x21-0x7e, and '%' itself, as %XX.  STATUS defaults to 200; the body is
"ok" for 2xx, "status N" otherwise, with Content-Type text/plain.  With JSON
(the rest of the line) the body is that text with Content-Type
application/json.  A name with no line answers 404 "not registered"; a request
without a domain parameter answers 400.

Modes (the last C<mode> line wins; default normal):

    normal      answer from the name lines
    status N    every request answers N (body "status N"), three digits, 000 to 999
    hang        read the request, never answer; close when the client does or after 30 s
    slow MS     sleep MS milliseconds (at most 99999), then answer normally
    close       close right after reading the request
    partial     "HTTP/1.1 200 OK", Content-Length: 100, 10 body bytes, close
    malformed   "HTTP/1.1 OK-ish\r\n\r\n", close
    endless     200, Connection: close, no length, body until 30 s, 50 MB or the client leaves
    redirect    302 with Location: http://127.0.0.1:1/
    reset       close with SO_LINGER 0 (TCP RST)

A file the service cannot parse makes every request answer 500 with the
reason in the body.

=head2 lookup_conf($dir, %settings)

Writes lookup.conf atomically (temporary file and rename) and returns its text.

    mode       => 'normal' | 'status 500' | 'slow 300' | 'hang' | ...
    registered => [ names ]                      # 200 "ok"
    status     => { name => 410, ... }           # per-name status
    json       => { name => '{"ttl": 2}', ... }  # per-name JSON body (status 200 unless set)

Names are raw bytes and are %XX-encoded as needed.  Croaks on unknown settings
or modes.

=head2 lookups($dir)

Request targets logged so far, in order.

=head2 lookup_count($dir, $domain)

Number of logged requests whose decoded domain parameter equals $domain.

=head2 lookup_log($dir)

The log as hashrefs C<< { time, pid, target, domain } >>.

=head2 lookup_conns($dir)

Number of connections accepted so far.

=head2 lookup_clear($dir)

Empties lookup.log and lookup.conns.

=cut
