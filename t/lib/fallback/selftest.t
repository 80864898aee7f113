#!/usr/bin/perl

# Self-test of the fallback Test::Nginx harness against a real nginx binary:
#   TEST_NGINX_BINARY=/path/to/nginx prove -v -I t/lib/fallback t/lib/fallback/selftest.t
# It lives outside t/*.t so that `prove t/` does not pick it up.

use v5.36;

use FindBin;
use lib $FindBin::Bin;    # always the fallback, even when nginx-tests is on @INC

use File::Path qw(rmtree);
use IO::Socket::INET;
use Socket qw(SOCK_DGRAM);
use Test::More;

use Test::Nginx qw(:DEFAULT http_content http_end);

my $t = Test::Nginx->new()->has(qw/http http_ssl sni rewrite proxy socket_ssl/)
    ->has_daemon('openssl')->plan(62);

my $d = $t->testdir();

# As root, workers run as nobody and cannot read the 0700 test directory.
if ($> == 0 && ($ENV{TEST_NGINX_GLOBALS} // '') !~ /\buser\b/) {
    $ENV{TEST_NGINX_GLOBALS} = join ' ', grep { defined } $ENV{TEST_NGINX_GLOBALS},
        'user root;';
}

###############################################################################
# Port mapping and expansion, before nginx exists.

my $p8080 = port(8080);
is(port(8080), $p8080, 'port: same symbolic port maps to the same real port');
isnt(port(8081), $p8080, 'port: distinct symbolic ports map apart');
ok($p8080 >= 8000 && $p8080 < 8500, 'port: real port stays in its 500-block');

my $lock = port(8080, socket => 1);
ok($lock && $lock->sockport() == $p8080 && $lock->socktype() == SOCK_DGRAM,
    'port: a tcp port is locked by a bound udp socket');
ok(!IO::Socket::INET->new(Proto => 'udp', LocalAddr => "127.0.0.1:$p8080"),
    'port: the lock keeps other binders off the port');

# A symbolic port that is busy is remapped within its block.
my ($busy, $holder);
for my $n (8400 .. 8499) {
    $holder = IO::Socket::INET->new(
        Proto => 'tcp', LocalAddr => "127.0.0.1:$n", Listen => 1,
    ) or next;
    $busy = $n;
    last;
}
my $pbusy = port($busy // 8400);
ok(defined $busy && $pbusy != $busy && $pbusy >= 8000 && $pbusy < 8500,
    'port: busy port remapped within its block');

$t->write_file_expand('expand.txt',
    "a 127.0.0.1:$busy b %%PORT_8999%% c %%PORT_8998_UDP%% d %%TESTDIR%%"
    . " e 127.0.0.1:${busy}1 f 127.0.0.1:9080\n");
is($t->read_file('expand.txt'),
    "a 127.0.0.1:$pbusy b " . port(8999) . ' c ' . port(8998, udp => 1)
    . " d $d e 127.0.0.1:${busy}1 f 127.0.0.1:9080\n",
    'expand: ports and test dir replaced, other addresses left alone');
close $holder if $holder;

###############################################################################
# nginx itself.

quiet(sub {
    system('openssl', 'req', '-x509', '-newkey', 'rsa:2048', '-nodes',
        '-subj', '/CN=localhost', '-days', '2',
        '-keyout', "$d/localhost.key", '-out', "$d/localhost.crt") == 0
        or die "openssl failed\n";
});

$t->write_file('static.txt', "static content\n");
$t->write_file_expand('nginx.conf', config(1));

like($t->read_file('nginx.conf'), qr{^pid \Q$d\E/nginx\.pid;$}m,
    'expand: test globals carry the pid file');
like($t->read_file('nginx.conf'), qr{^\s*root \Q$d\E;$}m,
    'expand: http globals carry the root');

$t->run();
my $master = $t->read_file('nginx.pid');
like($master, qr/^\d+\s*$/, 'run: nginx wrote its pid file');
ok($t->waitforfile("$d/nginx.pid"), 'waitforfile: existing file');

like(http_get('/'), qr{^HTTP/1\.1 200 .*plain $p8080 generation 1}s, 'http_get: plain');
like(http_get('/static.txt'), qr/static content/, 'http_get: file under root');

my $head = http_head('/static.txt');
like($head, qr{^HTTP/1\.1 200 }, 'http_head: status');
is(http_content($head), '', 'http_head: no body');

my $s = http_get('/', start => 1);
ok(ref $s, 'start: returns the socket');
like(http_end($s), qr/generation 1/, 'http_end: reads the rest');
is(http_get('/', aborted => 1), '', 'aborted: returns empty string');
is(http_get('/', PeerAddr => '127.0.0.1:' . port(8997)), undef,
    'http: refused connection gives undef');

like(http_get('/', SSL => 1, SSL_hostname => 'localhost'), qr/ssl localhost/,
    'http_get: ssl with sni');
like(http_get('/', SSL => 1, PeerAddr => '127.0.0.1:' . port(8444),
    SSL_hostname => 'localhost'), qr/named localhost/,
    'http_get: named server behind a rejecting default');

my ($reply, $log);
$log = verbose(sub {
    $reply = http_get('/', SSL => 1, PeerAddr => '127.0.0.1:' . port(8444),
        SSL_hostname => 'unknown.example');
});
is($reply, undef, 'ssl_reject_handshake: handshake fails, reply undef');
# OpenSSL names a received unrecognized_name alert "tlsv1 unrecognized name".
like($log, qr/^# << died: .*(?:alert|unrecognized name)/mi,
    'ssl_reject_handshake: reason names the alert');

$log = verbose(sub { http_get('/') });
like($log, qr{^# >> GET / HTTP/1\.0\\x0d$}m, 'log_out: request logged, CR escaped');
like($log, qr{^# << HTTP/1\.1 200 OK\\x0d$}m, 'log_in: reply logged');

$log = verbose(sub { log_in('x' x 3000) });
my ($xs) = $log =~ /^# << (x+)/m;
is(length($xs // ''), 2048, 'log_in: long message cut at 2048 bytes');

{
    delete local $ENV{TEST_NGINX_VERBOSE};
    $log = quiet_capture(sub { log_in('hidden') });
}
is($log, '', 'log_in: silent without TEST_NGINX_VERBOSE');

for my $case (
    [ 'plain body', "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", 'hello' ],
    [ 'chunked', "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        . "5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n", 'hello world' ],
    [ 'chunked, no last chunk', "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        . "5\r\nhello\r\n", 'hello[no-last-chunk]' ],
    [ 'chunked, truncated chunk', "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        . "a\r\nhel", '[no-last-chunk]' ],
    [ 'no header end', "HTTP/1.1 200 OK\r\n", undef ],
) {
    my ($name, $in, $want) = @$case;
    is(http_content($in), $want, "http_content: $name");
}

# A helper daemon, reached directly and through nginx.

my $p8081 = port(8081);
$t->run_daemon(\&responder, $p8081);
ok($t->waitforsocket("127.0.0.1:$p8081"), 'waitforsocket: daemon listens');
like(http_get('/', PeerAddr => "127.0.0.1:$p8081"), qr/daemon reply/, 'run_daemon: direct');
like(http_get('/proxy'), qr/daemon reply/, 'run_daemon: through nginx');

like($t->dump_config(), qr/ssl_reject_handshake on;/, 'dump_config: nginx -T output');

# Reload keeps the master and picks up the new configuration.

$t->write_file_expand('nginx.conf', config(2));
$t->reload();
for (1 .. 50) {
    $reply = http_get('/');
    last if defined $reply && $reply =~ /generation 2/;
    select(undef, undef, undef, 0.1);
}
like($reply, qr/generation 2/, 'reload: new configuration served');
is($t->read_file('nginx.pid'), $master, 'reload: same master process');

$t->stop_daemons();
ok(!IO::Socket::INET->new(Proto => 'tcp', PeerAddr => "127.0.0.1:$p8081"),
    'stop_daemons: daemon gone');

$t->stop();
my ($pid) = $master =~ /(\d+)/;
ok(!kill(0, $pid), 'stop: nginx master gone');
ok(!-e "$d/nginx.pid", 'stop: pid file removed');
$t->run();
my ($again) = $t->read_file('nginx.pid') =~ /(\d+)/;
ok($again && $again != $pid, 'run: starts again after stop');
ok(!defined $t->waitforfile("$d/never", $$ + 1_000_000),
    'waitforfile: gives up when the process is gone');

###############################################################################
# Feature detection against fake binaries with known `nginx -V` output.

my $fake = fake_nginx('fake-nginx', 'nginx version: nginx/1.25.3',
    'built with OpenSSL 3.0.2 15 Mar 2022', 'TLS SNI support enabled',
    'configure arguments: --with-http_ssl_module --with-stream'
    . ' --with-stream_ssl_module=dynamic --without-http_rewrite_module'
    . ' --with-mail --without-stream_map_module');
my $bare = fake_nginx('bare-nginx', 'nginx version: nginx/1.9.0',
    'configure arguments: --without-http');

my %expect = (
    $fake => {
        http => 1, http_ssl => 1, ssl => 1, sni => 1, stream => 1, stream_ssl => 0,
        stream_geo => 1, stream_map => 0, rewrite => 0, return => 0, proxy => 1,
        mail => 1, mail_smtp => 1, http_v2 => 0, cache => 1, 'openssl:3.0.0' => 1,
        'openssl:3.1' => 0, nonexistent => 0,
    },
    $bare => { http => 0, proxy => 0, sni => 0, stream => 0, stream_geo => 0 },
);
my %versions = (
    $fake => { '1.25.3' => 1, '1.25.4' => 0, '1.9.15' => 1, '1.100' => 0 },
    $bare => { '1.9' => 1, '1.9.0.1' => 0 },
);

for my $bin ($fake, $bare) {
    local $ENV{TEST_NGINX_BINARY} = $bin;
    my $f = Test::Nginx->new();
    my @wrong = grep { $f->has_module($_) != $expect{$bin}{$_} } sort keys %{$expect{$bin}};
    push @wrong, grep { $f->has_version($_) != $versions{$bin}{$_} }
        sort keys %{$versions{$bin}};
    is("@wrong", '', "has_module/has_version: $bin");
}

###############################################################################
# Behaviour that ends a test file, in subprocesses.

my ($out, $rc) = script('skip.t', <<'EOF');
my $t = Test::Nginx->new()->has(qw/http no_such_feature/)->plan(1);
ok(1);
EOF
like($out, qr/^1\.\.0 # SKIP no no_such_feature available$/m, 'has: skips missing feature');
is($rc, 0, 'has: skip exits 0');

($out, $rc) = script('daemon.t', <<'EOF');
my $t = Test::Nginx->new()->has_daemon('no-such-program-xyz')->plan(1);
ok(1);
EOF
like($out, qr/^1\.\.0 # SKIP no-such-program-xyz not found$/m, 'has_daemon: skips');

($out, $rc) = script('bail.t', <<'EOF', TEST_NGINX_BINARY => '/nonexistent/nginx');
my $t = Test::Nginx->new();
EOF
like($out, qr{^Bail out!\s+no /nonexistent/nginx binary found}m, 'new: bails out without binary');
isnt($rc, 0, 'new: bail out exits non-zero');

my $bad = <<'EOF';
my $t = Test::Nginx->new()->has(qw/http/);
print "# dir ", $t->testdir(), "\n";
$t->write_file('nginx.conf', "daemon off; events {} http { no_such_directive; }\n");
$t->try_run('bad config')->plan(1);
ok(1);
EOF
($out, $rc) = script('tryrun.t', $bad);
like($out, qr/^1\.\.0 # SKIP bad config$/m, 'try_run: skips on failure');
unlike($out, qr/no_such_directive/, 'try_run: quiet without verbose');
my ($dir) = $out =~ /^# dir (\S+)$/m;
ok(defined $dir && !-e $dir, 'DESTROY: temp dir removed');

($out, $rc) = script('tryrun-v.t', $bad, TEST_NGINX_VERBOSE => 1, TEST_NGINX_LEAVE => 1);
like($out, qr/^# .*unknown directive "no_such_directive"/m, 'try_run: verbose shows error.log');
($dir) = $out =~ /^# dir (\S+)$/m;
ok(defined $dir && -d $dir, 'TEST_NGINX_LEAVE: temp dir kept');
rmtree($dir) if defined $dir && $dir =~ /nginx-test-/;

my $alerts = <<'EOF';
my $t = Test::Nginx->new()->plan(1);
$t->todo_alerts() if $ENV{TODO};
$t->write_file('error.log', "x [alert] 1#1: boom\nx [notice] 1#1: fine\n");
ok(1, 'the test');
EOF
# The named sub keeps $t alive until global destruction.
($out, $rc) = script('clean.t', <<'EOF');
my $t = Test::Nginx->new()->plan(1);
ok(1, 'the test');
sub keeps_t_alive { $t }
EOF
like($out, qr/^1\.\.3\nok 1 - the test\nok 2 - no alerts\nok 3 - no sanitizer errors\n/m,
    'DESTROY: two checks complete plan(1)');
is($rc, 0, 'DESTROY: clean log passes');

($out, $rc) = script('alert.t', $alerts, TEST_NGINX_CATLOG => 1);
like($out, qr/^not ok 2 - no alerts$/m, 'DESTROY: alert fails the check');
like($out, qr/^# x \[notice\] 1#1: fine$/m, 'TEST_NGINX_CATLOG: log printed');
isnt($rc, 0, 'DESTROY: alert makes the file fail');

($out, $rc) = script('todo.t', $alerts, TODO => 1);
like($out, qr/^not ok 2 - no alerts # TODO/m, 'todo_alerts: check marked TODO');
is($rc, 0, 'todo_alerts: file passes');

###############################################################################

sub config ($generation) {
    return <<"EOF";
%%TEST_GLOBALS%%

daemon off;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    server {
        listen       127.0.0.1:8080;
        server_name  localhost;

        location / {
            return 200 "plain \$server_port generation $generation\\n";
        }
        location /static.txt {
        }
        location /proxy {
            proxy_pass http://127.0.0.1:8081/;
        }
    }

    server {
        listen       127.0.0.1:8443 ssl;
        server_name  localhost;

        ssl_certificate      localhost.crt;
        ssl_certificate_key  localhost.key;

        location / {
            return 200 "ssl \$ssl_server_name\\n";
        }
    }

    server {
        listen       127.0.0.1:8444 ssl default_server;
        ssl_reject_handshake on;
    }

    server {
        listen       127.0.0.1:8444 ssl;
        server_name  localhost;

        ssl_certificate      localhost.crt;
        ssl_certificate_key  localhost.key;

        location / {
            return 200 "named \$ssl_server_name\\n";
        }
    }
}
EOF
}

# Answers every request with a fixed reply; bounded in connections and time.
sub responder ($port) {
    my $server = IO::Socket::INET->new(
        Proto => 'tcp', LocalAddr => "127.0.0.1:$port", Listen => 5, ReuseAddr => 1,
    ) or die "Can't listen on $port: $!\n";

    local $SIG{ALRM} = sub { exit 0 };
    alarm(60);

    for (1 .. 50) {
        my $c = $server->accept() or next;
        while (defined(my $line = $c->getline())) {
            last if $line =~ /^\x0d?\x0a$/;
        }
        $c->print("HTTP/1.0 200 OK\r\nConnection: close\r\n\r\ndaemon reply\n");
        close $c;
    }
}

sub fake_nginx ($name, @lines) {
    my $path = "$d/$name";
    $t->write_file($name, "#!/bin/sh\ncat >&2 <<'EOT'\n" . join("\n", @lines) . "\nEOT\n");
    chmod 0755, $path or die "Can't chmod $path: $!\n";
    return $path;
}

# Runs a small test file that uses the harness; returns its output and exit code.
sub script ($name, $body, %env) {
    $t->write_file($name, "use v5.36;\nuse Test::More;\nuse Test::Nginx;\n$body");

    delete local @ENV{grep { /^TEST_NGINX_/ && $_ ne 'TEST_NGINX_BINARY' } keys %ENV};
    delete local $ENV{TODO};
    local @ENV{keys %env} = values %env;

    my $pid = open(my $fh, '-|') // die "Can't fork: $!\n";
    if ($pid == 0) {
        open STDERR, '>&', \*STDOUT;
        exec $^X, "-I$FindBin::Bin", "$d/$name";
        die "Can't exec $^X: $!\n";
    }
    local $/;
    my $out = <$fh>;
    close $fh;
    return ($out // '', $? >> 8);
}

sub verbose ($code) {
    local $ENV{TEST_NGINX_VERBOSE} = 1;
    return quiet_capture($code);
}

sub quiet_capture ($code) {
    my $err = '';
    open local *STDERR, '>', \$err or die "Can't capture: $!\n";
    $code->();
    return $err;
}

sub quiet ($code) {
    open my $saved, '>&', \*STDERR or die "Can't dup: $!\n";
    open STDERR, '>', '/dev/null' or die "Can't silence: $!\n";
    my $ok = eval { $code->(); 1 };
    open STDERR, '>&', $saved or die "Can't restore: $!\n";
    die $@ unless $ok;
}
