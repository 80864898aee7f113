#!/usr/bin/perl

# Self-test of Test::Nginx::SNIGuard:
#   prove -v t/lib/selftest-sniguard.t
# The TLS part needs an nginx binary with http_ssl (TEST_NGINX_BINARY, default
# below) and openssl; the lookup-service part needs nothing but curl for some
# cases.  It lives outside t/*.t so that `prove t/` does not pick it up.

use v5.36;

use FindBin;
use lib $FindBin::Bin;

use File::Temp qw(tempdir);
use IO::Select;
use IO::Socket::INET;
use IPC::Open3 qw(open3);
use POSIX qw(WNOHANG);
use Symbol qw(gensym);
use Test::More;
use Time::HiRes qw(time sleep);

use Test::Nginx::SNIGuard qw(:all);

my $NGINX = $ENV{TEST_NGINX_BINARY}
    // '/tmp/scratch/target/release/build/nginx-sys-e00acabee4531255/out/objs/nginx';

my $HAVE_CURL = !system('sh', '-c', 'command -v curl >/dev/null 2>&1');

# Processes to stop if the script dies half-way; each is removed once reaped.
my $MAIN = $$;
my %STARTED;
END {
    if ($$ == $MAIN) {
        local $?;
        for my $pid (keys %STARTED) {
            kill $STARTED{$pid}, $pid;
            reap($pid, 10) or kill('KILL', $pid) && reap($pid, 5);
        }
    }
}

###############################################################################
# Helpers

sub free_port () {
    my $s = IO::Socket::INET->new(
        LocalAddr => '127.0.0.1', LocalPort => 0, Listen => 1, Proto => 'tcp',
    ) or die "no free port: $@";
    my $port = $s->sockport();
    close $s;
    return $port;
}

sub wait_until ($timeout, $cond) {
    my $deadline = time() + $timeout;
    while (time() < $deadline) {
        return 1 if $cond->();
        sleep 0.05;
    }
    return $cond->() ? 1 : 0;
}

sub alive ($pid) { return kill(0, $pid) ? 1 : 0 }

sub reap ($pid, $timeout) {
    return wait_until($timeout, sub { waitpid($pid, WNOHANG) != 0 });
}

# One connection: send $request, read until EOF, $max bytes, an error or the timeout.
sub raw ($port, $request, %o) {
    my $timeout = $o{timeout} // 3;
    my $max     = $o{max} // 64 * 1024 * 1024;
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port, Proto => 'tcp')
        or return { error => "connect: $!" };
    local $SIG{PIPE} = 'IGNORE';
    syswrite($s, $request) if length $request;
    my %r = (data => '', start => time());
    my $sel = IO::Select->new($s);
    while (1) {
        my $left = $r{start} + $timeout - time();
        if ($left <= 0) { $r{timeout} = 1; last }
        next unless $sel->can_read($left);
        my $n = sysread($s, $r{data}, 65536, length $r{data});
        if (!defined $n) { $r{error} = "$!"; last }
        if ($n == 0)     { $r{eof} = 1;      last }
        last if length($r{data}) >= $max;
    }
    $r{elapsed} = time() - $r{start};
    close $s;
    return \%r;
}

sub get ($target, %h) {
    my $extra = join '', map { "$_: $h{$_}\r\n" } sort keys %h;
    return "GET $target HTTP/1.1\r\nHost: lookup\r\n$extra\r\n";
}

# Reads exactly one Content-Length delimited response from a kept-alive socket.
sub read_response ($s, $timeout = 3) {
    my $buf = '';
    my $sel = IO::Select->new($s);
    my $deadline = time() + $timeout;
    while (1) {
        my $end = index($buf, "\r\n\r\n");
        if ($end >= 0) {
            my ($len) = substr($buf, 0, $end) =~ /^Content-Length: (\d+)/mi;
            return $buf if length($buf) >= $end + 4 + ($len // 0);
        }
        my $left = $deadline - time();
        return undef if $left <= 0 || !$sel->can_read($left);
        my $n = sysread($s, $buf, 65536, length $buf);
        return length($buf) ? $buf : undef unless $n;
    }
}

sub curl (@args) {
    my $err = gensym();
    my $pid = open3(my $in, my $out, $err, 'curl', '-sS', '-m', '2', @args);
    close $in;
    local $/;
    my $stdout = <$out> // '';
    my $stderr = <$err> // '';
    waitpid($pid, 0);
    return { exit => $? >> 8, out => $stdout, err => $stderr };
}

sub parent_of ($pid) {
    open(my $fh, '<', "/proc/$pid/stat") or return 0;
    my $stat = <$fh> // '';
    # the command name in parentheses may contain spaces
    return $stat =~ /\)\s+\S+\s+(\d+)/ ? $1 : 0;
}

sub last_log ($dir) {
    my @log = lookup_log($dir);
    return $log[-1];
}

###############################################################################
# Lookup service

my $dir  = tempdir('sniguard-selftest-XXXXXX', TMPDIR => 1, CLEANUP => 1);
my $port = free_port();
my $url  = "http://127.0.0.1:$port/check";

lookup_conf($dir,
    registered => ['a.example', 'x y.example', "nul\x00.example"],
    status     => { 'b.example' => 410, 'c.example' => 403, 'e.example' => 500 },
    json       => { 'd.example' => '{"ttl": 2}' },
);

my $daemon = fork() // die "fork: $!";
if ($daemon == 0) {
    lookup_daemon($port, $dir);
}
$STARTED{$daemon} = 'TERM';
ok(wait_until(5, sub { -e "$dir/lookup.pid" }), 'daemon: lookup.pid appears');
{
    open(my $fh, '<', "$dir/lookup.pid") or die;
    chomp(my $pid = <$fh>);
    is($pid, $daemon, 'daemon: lookup.pid holds the service pid');
}

# An idle keep-alive connection, checked near the end: its process must quit
# by itself after the 10 s idle timeout.
my $idle = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port) or die;
syswrite($idle, get('/check?domain=idle.example'));
like(read_response($idle) // '', qr{^HTTP/1\.1 404 }, 'idle: first request answered');
my $idle_pid   = last_log($dir)->{pid};
my $idle_since = time();

# Registered, unregistered, overrides, JSON, decoding.
{
    my $r = raw($port, get('/check?domain=a.example', Connection => 'close'));
    like($r->{data}, qr{^HTTP/1\.1 200 OK\r\n}, 'normal: registered -> 200');
    like($r->{data}, qr{\r\n\r\nok\z}, 'normal: body "ok"');
    like($r->{data}, qr{^Content-Type: text/plain\r$}m, 'normal: text/plain');
    ok($r->{eof}, 'normal: Connection: close honoured');

    $r = raw($port, get('/check?domain=other.example', Connection => 'close'));
    like($r->{data}, qr{^HTTP/1\.1 404 }, 'normal: unregistered -> 404');

    $r = raw($port, get('/check?domain=nul%00.example', Connection => 'close'));
    like($r->{data}, qr{^HTTP/1\.1 200 }, 'normal: %00 decoded and matched');

    $r = raw($port, get('/check?x=1', Connection => 'close'));
    like($r->{data}, qr{^HTTP/1\.1 400 }, 'normal: no domain parameter -> 400');

    $r = raw($port, "GET /check?domain=a.example HTTP/1.0\r\n\r\n");
    like($r->{data}, qr{^HTTP/1\.1 200 .*Connection: close\r\n}s, 'http/1.0: answered');
    ok($r->{eof} && $r->{elapsed} < 1, 'http/1.0: closed without keep-alive');
}

SKIP: {
    skip 'no curl', 16 unless $HAVE_CURL;
    my $w = ['-w', '\n%{http_code} %{content_type}'];
    my $c = curl(@$w, "$url?domain=a.example");
    is($c->{out}, "ok\n200 text/plain", 'curl: registered -> 200 ok');
    $c = curl(@$w, "$url?domain=nope.example");
    like($c->{out}, qr{\n404 text/plain\z}, 'curl: unregistered -> 404');
    for my $case (['b.example', 410], ['c.example', 403], ['e.example', 500]) {
        $c = curl(@$w, "$url?domain=$case->[0]");
        like($c->{out}, qr{\n$case->[1] text/plain\z}, "curl: override $case->[0] -> $case->[1]");
    }
    $c = curl(@$w, "$url?domain=d.example");
    is($c->{out}, qq({"ttl": 2}\n200 application/json), 'curl: JSON body and type');
    $c = curl(@$w, "$url?domain=x%20y.example");
    like($c->{out}, qr{\n200 text/plain\z}, 'curl: %20 decoded');

    # The log: format, order, decoding.
    my @t = lookups($dir);
    is_deeply([@t[-7 .. -1]],
        [map {"/check?domain=$_"} qw(a.example nope.example b.example c.example e.example
            d.example x%20y.example)],
        'log: request targets in order');
    is(lookup_count($dir, 'x y.example'), 1, 'log: lookup_count decodes %XX');
    is(lookup_count($dir, 'a.example'),   3, 'log: lookup_count counts every request');
    is(lookup_count($dir, "nul\x00.example"), 1, 'log: lookup_count matches a NUL');
    open(my $fh, '<', "$dir/lookup.log") or die;
    my @lines = <$fh>;
    is(scalar(grep { !m{^\d{10}\.\d{3} \d+ /\S*\n\z} } @lines), 0,
        'log: every line is "<time.ms> <pid> <target>"');
    my $l = last_log($dir);
    ok(abs($l->{time} - time()) < 5, 'log: time is now');

    # Configuration is read again for every request.
    lookup_conf($dir, mode => 'status 503', registered => ['a.example']);
    $c = curl(@$w, "$url?domain=a.example");
    like($c->{out}, qr{\n503 text/plain\z}, 'status 503: every request answers 503');
    lookup_conf($dir, mode => 'redirect');
    $c = curl('-o', '/dev/null', '-w', '%{http_code} %{redirect_url}', "$url?domain=a.example");
    is($c->{out}, '302 http://127.0.0.1:1/', 'redirect: curl sees 302 to 127.0.0.1:1');
    lookup_conf($dir, mode => 'normal', registered => ['a.example']);
    $c = curl(@$w, "$url?domain=a.example");
    like($c->{out}, qr{\n200 text/plain\z}, 'conf change back to normal seen');
}

# Keep-alive: requests on one connection are one accepted connection.
{
    lookup_conf($dir, registered => ['a.example']);
    my $before = lookup_conns($dir);
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port) or die;
    syswrite($s, get('/check?domain=a.example'));
    my $one = read_response($s);
    syswrite($s, get('/check?domain=zz.example'));
    my $two = read_response($s);
    # pipelined: two requests in one write
    syswrite($s, get('/check?domain=a.example') . get('/check?domain=zz.example'));
    my $three = read_response($s);
    my $four  = read_response($s);
    close $s;
    like($one // '', qr{^HTTP/1\.1 200 }, 'keep-alive: first answer');
    like($two // '', qr{^HTTP/1\.1 404 }, 'keep-alive: second answer on the same connection');
    ok(($three // '') =~ /^HTTP\/1\.1 200 / && ($four // '') =~ /^HTTP\/1\.1 404 /,
        'keep-alive: pipelined answers');
    is(lookup_conns($dir) - $before, 1, 'keep-alive: one line in lookup.conns');
    my @log = (lookup_log($dir))[-4 .. -1];
    is(scalar(keys %{{map { $_->{pid} => 1 } @log}}), 1, 'keep-alive: one process served all');

    $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port) or die;
    syswrite($s, "GET /check?domain=a.example HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    my $ka = read_response($s);
    syswrite($s, "GET /check?domain=a.example HTTP/1.0\r\n\r\n");
    my $ka2 = read_response($s);
    close $s;
    like($ka // '', qr{^Connection: keep-alive\r$}m, 'http/1.0 keep-alive: honoured');
    like($ka2 // '', qr{^HTTP/1\.1 200 }, 'http/1.0 keep-alive: second request served');
}

# slow, and connections served concurrently
{
    lookup_conf($dir, mode => 'slow 700', registered => ['a.example']);
    my $r = raw($port, get('/check?domain=a.example', Connection => 'close'));
    like($r->{data}, qr{^HTTP/1\.1 200 .*\r\n\r\nok\z}s, 'slow: normal answer');
    ok($r->{elapsed} >= 0.69 && $r->{elapsed} < 2, "slow: after $r->{elapsed} s");

    lookup_conf($dir, mode => 'slow 1000', registered => ['a.example']);
    my $start = time();
    my @s = map {
        my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port) or die;
        syswrite($s, get('/check?domain=a.example'));
        $s
    } 1 .. 3;
    my @answers = map { read_response($_, 4) // '' } @s;
    close $_ for @s;
    my $took = time() - $start;
    is(scalar(grep {/^HTTP\/1\.1 200 /} @answers), 3, 'concurrency: three slow answers');
    ok($took < 1.9, "concurrency: three 1 s answers took $took s");
}

# hang
{
    lookup_conf($dir, mode => 'hang');
    my $r = raw($port, get('/check?domain=hang.example'), timeout => 1.5);
    ok($r->{timeout} && $r->{data} eq '', 'hang: raw client gets nothing and times out');
    my $pid = last_log($dir)->{pid};
    is(last_log($dir)->{target}, '/check?domain=hang.example', 'hang: request still logged');
    ok(wait_until(3, sub { !alive($pid) }), 'hang: process ends when the client closes');
    SKIP: {
        skip 'no curl', 1 unless $HAVE_CURL;
        my $c = curl("$url?domain=hang.example");
        is($c->{exit}, 28, 'hang: curl -m 2 times out (exit 28)');
    }
}

# close, partial, malformed, reset
{
    lookup_conf($dir, mode => 'close');
    my $r = raw($port, get('/check?domain=a.example'));
    ok($r->{eof} && $r->{data} eq '', 'close: EOF, no bytes');

    lookup_conf($dir, mode => 'partial');
    $r = raw($port, get('/check?domain=a.example'));
    like($r->{data}, qr{^HTTP/1\.1 200 OK\r\n.*Content-Length: 100\r\n\r\n0123456789\z}s,
        'partial: header and 10 of 100 body bytes');
    ok($r->{eof}, 'partial: then EOF');

    lookup_conf($dir, mode => 'malformed');
    $r = raw($port, get('/check?domain=a.example'));
    is($r->{data}, "HTTP/1.1 OK-ish\r\n\r\n", 'malformed: exact bytes');
    ok($r->{eof}, 'malformed: then EOF');

    lookup_conf($dir, mode => 'reset');
    $r = raw($port, get('/check?domain=a.example'));
    like($r->{error} // '', qr/reset/i,
        'reset: client read fails (' . ($r->{error} // 'none') . ')');

    SKIP: {
        skip 'no curl', 4 unless $HAVE_CURL;
        lookup_conf($dir, mode => 'close');
        my $c = curl("$url?domain=a.example");
        is($c->{exit}, 52, 'close: curl "empty reply" (exit 52)');
        lookup_conf($dir, mode => 'partial');
        $c = curl("$url?domain=a.example");
        is($c->{exit}, 18, 'partial: curl "transfer closed with bytes remaining" (exit 18)');
        lookup_conf($dir, mode => 'malformed');
        $c = curl("$url?domain=a.example");
        my $why = $c->{err} =~ s/\s+\z//r;
        isnt($c->{exit}, 0, "malformed: curl fails (exit $c->{exit}: $why)");
        lookup_conf($dir, mode => 'reset');
        $c = curl("$url?domain=a.example");
        is($c->{exit}, 56, 'reset: curl "connection reset" (exit 56)');
    }
}

# endless
{
    lookup_conf($dir, mode => 'endless');
    my $r = raw($port, get('/check?domain=a.example'), max => 1024 * 1024);
    like($r->{data}, qr{^HTTP/1\.1 200 OK\r\n}, 'endless: 200');
    my ($head) = split /\r\n\r\n/, $r->{data}, 2;
    ok($head !~ /Content-Length/i && $head =~ /^Connection: close\r?$/mi,
        'endless: no Content-Length, Connection: close');
    ok(length($r->{data}) >= 1024 * 1024, 'endless: client read 1 MB and left');
    my $pid = last_log($dir)->{pid};
    ok(wait_until(5, sub { !alive($pid) }), 'endless: process ends when the client leaves');

    $r = raw($port, get('/check?domain=a.example'), timeout => 40);
    my $body = length($r->{data}) - index($r->{data}, "\r\n\r\n") - 4;
    ok($r->{eof} && $body == 50 * 1024 * 1024,
        "endless: stops by itself after 50 MB (got $body bytes in "
        . sprintf('%.1f', $r->{elapsed}) . ' s)');
    SKIP: {
        skip 'no curl', 1 unless $HAVE_CURL;
        my $c = curl('-o', '/dev/null', '-w', '%{size_download}', "$url?domain=a.example");
        ok(($c->{exit} == 28 || $c->{exit} == 0) && $c->{out} > 1024 * 1024,
            "endless: curl got $c->{out} bytes (exit $c->{exit})");
    }
}

# a configuration the service cannot read, and lookup_conf's own checks
{
    open(my $fh, '>', "$dir/lookup.conf") or die;
    print {$fh} "mode sideways\n";
    close $fh;
    my $r = raw($port, get('/check?domain=a.example', Connection => 'close'));
    like($r->{data}, qr{^HTTP/1\.1 500 .*lookup\.conf line 1: unknown mode}s,
        'bad lookup.conf: 500 with the reason');
    ok(!eval { lookup_conf($dir, mode => 'sideways'); 1 }, 'lookup_conf: unknown mode croaks');
    ok(!eval { lookup_conf($dir, mode => 'slow'); 1 },     'lookup_conf: slow needs MS');
    ok(!eval { lookup_conf($dir, names => []); 1 },        'lookup_conf: unknown setting croaks');
    lookup_conf($dir, registered => ['a.example']);
}

# The same service over TLS, on a port and in a directory of its own.
SKIP: {
    skip 'no openssl', 31 if system('sh', '-c', 'command -v openssl >/dev/null 2>&1');

    my $tdir  = tempdir('sniguard-tls-XXXXXX', TMPDIR => 1, CLEANUP => 1);
    my $tport = free_port();
    my $turl  = "https://localhost:$tport/check";
    make_cert($tdir, 'localhost');
    lookup_conf($tdir, registered => ['a.example'], json => { 'd.example' => '{"ttl": 2}' });

    my $tdaemon = fork() // die "fork: $!";
    if ($tdaemon == 0) {
        lookup_daemon($tport, $tdir,
            tls => { cert => "$tdir/localhost.crt", key => "$tdir/localhost.key" });
    }
    $STARTED{$tdaemon} = 'TERM';
    ok(wait_until(5, sub { -e "$tdir/lookup.pid" }), 'tls: lookup.pid appears');

    my $tls_lines = sub {
        open(my $fh, '<', "$tdir/lookup.tls") or return ();
        return <$fh>;
    };

    # A client that connects and never starts its handshake; checked at the end.
    my $silent = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $tport) or die;
    my $silent_since = time();

    # A TLS client of our own: keep-alive and pipelining over one connection.
    require IO::Socket::SSL;
    my $before = lookup_conns($tdir);
    my $s = IO::Socket::SSL->new(
        PeerAddr => '127.0.0.1', PeerPort => $tport, Timeout => 3,
        SSL_hostname => 'localhost', SSL_ca_file => "$tdir/ca.crt",
        SSL_verifycn_name => 'localhost', SSL_verifycn_scheme => 'http',
    );
    ok($s, 'tls client: handshake with the test CA and the name localhost')
        or diag($IO::Socket::SSL::SSL_ERROR);
    my @answers;
    if ($s) {
        syswrite($s, get('/check?domain=a.example'));
        push @answers, read_response($s);
        syswrite($s, get('/check?domain=zz.example') . get('/check?domain=a.example'));
        push @answers, read_response($s), read_response($s);
        $s->close(SSL_fast_shutdown => 1);
    }
    like($answers[0] // '', qr{^HTTP/1\.1 200 .*\r\n\r\nok\z}s, 'tls client: 200 ok');
    like($answers[1] // '', qr{^HTTP/1\.1 404 }, 'tls client: pipelined, first answer 404');
    like($answers[2] // '', qr{^HTTP/1\.1 200 }, 'tls client: pipelined, second answer 200');
    is(lookup_conns($tdir) - $before, 1, 'tls client: three requests, one connection');
    is_deeply([(lookups($tdir))[-3 .. -1]],
        [map {"/check?domain=$_"} qw(a.example zz.example a.example)],
        'tls client: requests logged in order');

    SKIP: {
        skip 'no curl', 16 unless $HAVE_CURL;
        my @ca = ('--cacert', "$tdir/ca.crt");
        my $w  = ['-w', '\n%{http_code} %{content_type}'];

        my $c = curl(@ca, @$w, "$turl?domain=a.example");
        is($c->{out}, "ok\n200 text/plain", 'tls curl --cacert: registered -> 200 ok');
        $c = curl(@ca, @$w, "$turl?domain=d.example");
        is($c->{out}, qq({"ttl": 2}\n200 application/json), 'tls curl: JSON body and type');

        $before = lookup_conns($tdir);
        $c = curl(@ca, '-o', '/dev/null', '-o', '/dev/null', '-w', '%{http_code} ',
            "$turl?domain=a.example", "$turl?domain=nope.example");
        is($c->{out}, '200 404 ', 'tls curl: two URLs in one run');
        is(lookup_conns($tdir) - $before, 1, 'tls curl: kept alive, one connection for two');

        # Clients that do not trust the service end at the handshake: no request.
        my $requests = () = lookups($tdir);
        my $failed   = () = $tls_lines->();
        $c = curl("$turl?domain=a.example");
        is($c->{exit}, 60, 'tls curl without --cacert: certificate not trusted (exit 60)');
        ok(wait_until(2, sub { scalar(() = $tls_lines->()) > $failed }),
            'tls: the failed handshake is logged in lookup.tls');
        like(($tls_lines->())[-1] // '', qr/^\d+\.\d{3} \d+ handshake failed: .*unknown ca\n\z/,
            'tls: lookup.tls says "<time> <pid> handshake failed: ... unknown ca"');
        is(scalar(() = lookups($tdir)), $requests, 'tls: nothing logged in lookup.log');

        $c = curl(@ca, "https://127.0.0.1:$tport/check?domain=a.example");
        is($c->{exit}, 60, 'tls: the certificate is for localhost only, not 127.0.0.1 (exit 60)');

        # The modes work the same over TLS.
        lookup_conf($tdir, mode => 'status 503');
        $c = curl(@ca, @$w, "$turl?domain=a.example");
        like($c->{out}, qr{\n503 text/plain\z}, 'tls status 503: answers 503');
        lookup_conf($tdir, mode => 'hang');
        $c = curl(@ca, "$turl?domain=a.example");
        is($c->{exit}, 28, 'tls hang: curl -m 2 times out (exit 28)');
        lookup_conf($tdir, mode => 'close');
        $c = curl(@ca, "$turl?domain=a.example");
        is($c->{exit}, 52, 'tls close: curl "empty reply" (exit 52)');
        lookup_conf($tdir, mode => 'partial');
        $c = curl(@ca, "$turl?domain=a.example");
        is($c->{exit}, 18, 'tls partial: curl "transfer closed with bytes remaining" (exit 18)');
        lookup_conf($tdir, mode => 'malformed');
        $c = curl(@ca, "$turl?domain=a.example");
        my $why = $c->{err} =~ s/\s+\z//r;
        isnt($c->{exit}, 0, "tls malformed: curl fails (exit $c->{exit}: $why)");
        lookup_conf($tdir, mode => 'reset');
        $c = curl(@ca, "$turl?domain=a.example");
        is($c->{exit}, 56, 'tls reset: curl "connection reset" (exit 56)');
        lookup_conf($tdir, mode => 'normal', registered => ['a.example']);
        $c = curl(@ca, @$w, "$turl?domain=a.example");
        like($c->{out}, qr{\n200 text/plain\z}, 'tls: back to normal');
    }

    # Plain HTTP on the TLS port is not a handshake.
    my $requests = () = lookups($tdir);
    my $r = raw($tport, get('/check?domain=a.example', Connection => 'close'));
    ok($r->{data} !~ /^HTTP/ && !$r->{timeout}, 'tls: plain HTTP request gets no HTTP answer');
    is(scalar(() = lookups($tdir)), $requests, 'tls: plain HTTP request not logged');

    # The silent client: the handshake wait is bounded (5 s).
    is(read_response($silent, 8), undef, 'tls: silent client is dropped');
    close $silent;
    my ($gave_up) = map { (split ' ')[0] } grep {/ handshake timed out$/} $tls_lines->();
    my $waited = defined $gave_up ? $gave_up - $silent_since : -1;
    ok($waited >= 4.5 && $waited < 6.5,
        sprintf('tls: lookup.tls says "handshake timed out", %.1f s after connect', $waited));

    kill 'TERM', $tdaemon;
    ok(reap($tdaemon, 5), 'tls: service exits on TERM') and delete $STARTED{$tdaemon};

    # Configuration mistakes stop the service before it listens.
    for my $case (
        ['missing certificate', tls => { cert => "$tdir/none.crt", key => "$tdir/localhost.key" }],
        ['key without certificate', tls => { key => "$tdir/localhost.key" }],
        ['unknown option', tsl => {}],
    ) {
        my ($what, @opts) = @$case;
        my $bdir = tempdir('sniguard-bad-XXXXXX', TMPDIR => 1, CLEANUP => 1);
        my $pid  = fork() // die "fork: $!";
        if ($pid == 0) {
            open(STDERR, '>', "$bdir/stderr") or POSIX::_exit(126);
            lookup_daemon(free_port(), $bdir, @opts);
        }
        $STARTED{$pid} = 'TERM';
        ok(reap($pid, 5) && $? >> 8 == 1 && !-e "$bdir/lookup.pid",
            "tls: $what: service exits 1 without listening") and delete $STARTED{$pid};
    }
}

# idle timeout of the connection opened at the start
{
    ok(alive($idle_pid) || time() - $idle_since >= 10, 'idle: process alive before its timeout');
    ok(wait_until(15, sub { !alive($idle_pid) }), 'idle: process quits by itself');
    my $waited = time() - $idle_since;
    ok($waited >= 9.5, sprintf('idle: after %.1f s', $waited));
    is(read_response($idle, 1), undef, 'idle: client sees the connection closed');
    close $idle;
}

# SIGTERM takes the connection processes with it
{
    lookup_conf($dir, mode => 'hang');
    my @held = map {
        my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port) or die;
        syswrite($s, get("/check?domain=held$_.example"));
        $s
    } 1 .. 3;
    ok(wait_until(3, sub { lookup_count($dir, 'held3.example') == 1 }), 'term: three hanging');
    my @kids = map { $_->{pid} } grep { ($_->{domain} // '') =~ /^held/ } lookup_log($dir);
    is(scalar(grep { alive($_) } @kids), 3, 'term: their processes are alive');
    kill 'TERM', $daemon;
    ok(reap($daemon, 5), 'term: service exits') and delete $STARTED{$daemon};
    is(scalar(grep { alive($_) } @kids), 0, 'term: no connection process left');
    my @all = map { (split ' ')[1] } do {
        open(my $fh, '<', "$dir/lookup.conns") or die;
        <$fh>;
    };
    is(scalar(grep { alive($_) } @all), 0,
        'term: none of the ' . scalar(@all) . ' connection processes ever started is alive');
    ok(!-e "$dir/lookup.pid", 'term: lookup.pid removed');
    close $_ for @held;
}

###############################################################################
# TLS tools against a real nginx

SKIP: {
    skip "no nginx at $NGINX", 1 unless -x $NGINX;
    skip 'no openssl', 1 if system('sh', '-c', 'command -v openssl >/dev/null 2>&1');

    my $nd = tempdir('sniguard-nginx-XXXXXX', TMPDIR => 1, CLEANUP => 1);
    mkdir "$nd/logs";
    system("openssl req -x509 -newkey rsa:2048 -nodes -subj /CN=localhost -days 1"
        . " -keyout $nd/k.pem -out $nd/c.pem >/dev/null 2>&1") == 0
        or die 'openssl req failed';

    my $tls  = free_port();
    my $user = $> == 0 ? 'user root;' : '';
    open(my $fh, '>', "$nd/nginx.conf") or die;
    print {$fh} <<"EOF";
daemon off;
master_process on;
worker_processes 1;
$user
pid $nd/nginx.pid;
error_log $nd/error.log info;
events {}
http {
    access_log off;
    ssl_session_cache shared:SSL:1m;
    ssl_session_tickets on;
    server {
        listen 127.0.0.1:$tls ssl default_server;
        ssl_certificate $nd/c.pem;
        ssl_certificate_key $nd/k.pem;
        return 200 "hello";
    }
    server {
        listen 127.0.0.1:$tls ssl;
        server_name rejected.example;
        ssl_reject_handshake on;
    }
}
EOF
    close $fh;

    my $nginx = fork() // die "fork: $!";
    if ($nginx == 0) {
        open(STDOUT, '>', "$nd/stdout") or POSIX::_exit(126);
        open(STDERR, '>&', \*STDOUT)     or POSIX::_exit(126);
        exec($NGINX, '-p', "$nd/", '-c', "$nd/nginx.conf", '-e', "$nd/error.log")
            or POSIX::_exit(127);
    }
    $STARTED{$nginx} = 'QUIT';
    my $up = wait_until(5, sub {
        IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $tls) ? 1 : 0;
    });
    ok($up, 'nginx: started') or diag(`cat $nd/stdout $nd/error.log`);

    # raw ClientHello cases
    my @raw = (
        ['normal name',                 [sni => 'localhost'],         'handshake'],
        ['no server_name extension',    [neither => 1],               'handshake'],
        ['ssl_reject_handshake name',   [sni => 'rejected.example'],  'alert', 112],
        ['list length wrong',
            [ext => pack('n', 200) . pack('C n/a*', 0, 'a.example')], 'alert', 50],
        ['empty extension body',        [ext => ''],                  'alert', 50],
        ['name length past the end',
            [ext => pack('n', 12) . pack('C n', 0, 40) . 'a.example'], 'alert', 50],
        ['65000-byte malformed ext (4 records)',
            [ext => pack('n', 0xffff) . ('a' x 64998)],               'alert', 50],
        ['300-byte name',               [sni => join('.', ('a' x 59) x 5)], 'alert'],
        ['40000-byte name (3 records)', [sni => 'a' x 40000],         'alert'],
        ['NUL inside the name',         [sni => "a\x00b.example"],    'alert'],
        ['empty name',                  [sni => ''],                  undef],
        ['non-ASCII name',              [sni => "ex\xc3\xa4mple.com"], undef],
        ['IPv4 literal',                [sni => '127.0.0.1'],         undef],
        ['name with a space',           [sni => 'a b.example'],       undef],
        ['trailing dot',                [sni => 'localhost.'],        undef],
    );
    for my $case (@raw) {
        my ($what, $opts, $outcome, $alert) = @$case;
        my $r = client_hello($tls, @$opts, timeout => 3);
        my $seen = $r->{outcome}
            . (defined $r->{alert} ? " $r->{alert} ($r->{alert_name}, level $r->{level})" : '')
            . ", $r->{bytes} bytes back, $r->{sent} sent";
        if (!defined $outcome) {
            ok($r->{outcome} =~ /^(?:alert|handshake)$/, "raw $what: $seen");
            next;
        }
        is($r->{outcome}, $outcome, "raw $what: $seen");
        is($r->{alert}, $alert, "raw $what: alert $alert") if defined $alert;
        is($r->{level}, 2, "raw $what: fatal") if $outcome eq 'alert';
        is($r->{handshake_type}, 2, "raw $what: a ServerHello") if $outcome eq 'handshake';
    }
    ok(!eval { client_hello($tls, ext => 'a' x 65443); 1 }, 'raw: oversized hello croaks');
    ok(!eval { client_hello($tls, sni => 'a', neither => 1); 1 }, 'raw: conflicting options croak');
    my $closed = free_port();
    is(client_hello($closed, neither => 1)->{outcome}, 'refused', 'raw: nothing listening');

    # A listener that never accepts: the kernel takes the hello, nobody answers.
    my $mute = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 0, Listen => 5)
        or die;
    my $start = time();
    my $r = client_hello($mute->sockport(), neither => 1, timeout => 1);
    my $took = time() - $start;
    ok($r->{outcome} eq 'timeout' && $took >= 0.9 && $took < 2,
        sprintf('raw: silent server -> %s after %.1f s', $r->{outcome}, $took));

    close $mute;

    # One that reads the hello and closes.
    $mute = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 0, Listen => 5)
        or die;
    my $closer = fork() // die;
    if ($closer == 0) {
        my $c = $mute->accept() or POSIX::_exit(1);
        sysread($c, my $junk, 65536);
        close $c;
        POSIX::_exit(0);
    }
    $r = client_hello($mute->sockport(), sni => 'a.example', timeout => 3);
    is($r->{outcome}, 'closed', 'raw: server closing without a byte -> closed');
    is($r->{bytes}, 0, 'raw: closed: 0 bytes');
    ok(reap($closer, 3), 'raw: closing helper reaped');
    close $mute;

    # The same two servers for tls_get.
    $mute = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 0, Listen => 5)
        or die;
    $start = time();
    my $g = tls_get($mute->sockport(), 'a.example', timeout => 1);
    $took = time() - $start;
    ok(!$g->{ok} && $g->{timeout} && $took < 2,
        sprintf('tls_get: silent server -> "%s" after %.1f s', $g->{error}, $took));
    close $mute;
    $mute = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 0, Listen => 5)
        or die;
    $closer = fork() // die;
    if ($closer == 0) {
        my $c = $mute->accept() or POSIX::_exit(1);
        sysread($c, my $junk, 65536);
        close $c;
        POSIX::_exit(0);
    }
    $g = tls_get($mute->sockport(), 'a.example', timeout => 3);
    ok(!$g->{ok} && !$g->{timeout} && $g->{error} =~ /eof/i,
        "tls_get: server closing -> \"$g->{error}\"");
    ok(reap($closer, 3), 'tls_get: closing helper reaped');
    close $mute;

    # full handshakes
    $g = tls_get($tls, 'localhost');
    ok($g->{ok} && $g->{status} == 200 && $g->{body} eq 'hello', 'tls_get: 200 "hello"')
        or diag explain $g;
    like($g->{reply}, qr{^HTTP/1\.1 200 OK\r\n}, 'tls_get: full reply kept');
    $g = tls_get($tls, undef, uri => '/x');
    ok($g->{ok} && $g->{body} eq 'hello', 'tls_get: no SNI');
    $g = tls_get($tls, 'rejected.example');
    ok(!$g->{ok}, 'tls_get rejected.example: fails');
    like($g->{error} // '', qr/unrecognized name/, "tls_get rejected.example: $g->{error}");

    for my $v (qw(TLSv1_2 TLSv1_3)) {
        my $first = tls_get($tls, 'localhost', version => $v);
        ok($first->{ok} && $first->{protocol} eq $v && !$first->{reused},
            "resume $v: first connection full ($first->{protocol})");
        my $second = tls_get($tls, 'localhost', session => $first->{session});
        ok($second->{ok} && $second->{reused} && $second->{protocol} eq $v,
            "resume $v: second connection reused => $second->{reused}");
        is($second->{body}, 'hello', "resume $v: resumed connection works");
        my $third = tls_get($tls, 'other.example', session => $first->{session});
        ok($third->{ok}, "resume $v: other name with the session: reused => $third->{reused}");
        my $rej = tls_get($tls, 'rejected.example', session => $first->{session});
        if ($v eq 'TLSv1_3') {
            like($rej->{error} // '', qr/unrecognized name/,
                "resume $v: ssl_reject_handshake name refused when resuming");
        } else {
            # On a TLS 1.2 resumption SSL_get_servername() gives the session's
            # name, so nginx's servername callback never sees rejected.example:
            # the handshake resumes and the request lands on that server by Host.
            ok($rej->{ok} && $rej->{reused} && $rej->{status} == 404,
                "resume $v: ssl_reject_handshake name NOT refused when resuming"
                . ' (OpenSSL gives the callback the session name)');
        }
        my $fresh = tls_get($tls, 'localhost', version => $v);
        ok($fresh->{ok} && !$fresh->{reused}, "resume $v: without session not reused");
    }

    my @workers = grep { parent_of($_) == $nginx } map { m{/proc/(\d+)$} ? $1 : () }
        glob '/proc/[0-9]*';
    ok(@workers >= 1, 'nginx: worker process(es) ' . join(',', @workers));
    kill 'QUIT', $nginx;
    ok(reap($nginx, 10), 'nginx: master exits on QUIT') and delete $STARTED{$nginx};
    ok(wait_until(5, sub { !grep { alive($_) } @workers }), 'nginx: no worker left');
    my $log = do { local (@ARGV, $/) = "$nd/error.log"; <> };
    like($log, qr/SSL_do_handshake\(\) failed/, 'nginx: logged the refused handshakes');
}

done_testing();
