#!/usr/bin/perl

# Tests for sni_guard: the breaker and the error policy.  After ERRORS lookup
# errors in a row (sni_guard_breaker ERRORS TIME) the zone stops asking the
# lookup service: new names are answered at once by sni_guard_on_error, stale
# answers are used without a refresh; after TIME a single probe lookup goes,
# and its success closes the breaker, its failure keeps it open another TIME.
# With sni_guard_on_error allow a lookup error lets the handshake through and
# nothing is cached.  With the breaker off every error reaches the service.
# Failed lookups are logged at warn with the URL and the cause, so the breaker
# is also what keeps the log quiet while the service is down.

###############################################################################

use warnings;
use strict;

use Test::More;

use POSIX ();
use Time::HiRes qw/ time sleep /;

BEGIN { use FindBin; chdir($FindBin::Bin); }

use lib 'lib';
use Test::Nginx;
use Test::Nginx::SNIGuard qw/ :all /;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

eval { require IO::Socket::SSL; };
plan(skip_all => 'IO::Socket::SSL not installed') if $@;

my $t = Test::Nginx->new()->has(qw/http http_ssl/)->has_daemon('openssl');

$t->write_file_expand('nginx.conf', <<'EOF');

%%TEST_GLOBALS%%

daemon off;
worker_processes 2;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    ssl_certificate     localhost.crt;
    ssl_certificate_key localhost.key;

    sni_guard on;
    sni_guard_timeout 300ms;

    # the breaker: opens, probes, closes; stale answers while open
    server {
        listen       127.0.0.1:8443 ssl;
        server_name  localhost;

        sni_guard_zone    breaker:1m;
        sni_guard_lookup  http://127.0.0.1:%%PORT_8081%%/check;
        sni_guard_breaker 3 2s;
        sni_guard_valid   500ms;
        sni_guard_stale   30s;

        location / {
            return 200 "name $ssl_server_name";
        }
    }

    # lookup errors let handshakes through
    server {
        listen       127.0.0.1:8444 ssl;
        server_name  localhost;

        sni_guard_zone     allow:1m;
        sni_guard_lookup   http://127.0.0.1:%%PORT_8082%%/check;
        sni_guard_breaker  3 2s;
        sni_guard_on_error allow;

        location / {
            return 200 "name $ssl_server_name";
        }
    }

    # no breaker
    server {
        listen       127.0.0.1:8445 ssl;
        server_name  localhost;

        sni_guard_zone    off:1m;
        sni_guard_lookup  http://127.0.0.1:%%PORT_8083%%/check;
        sni_guard_breaker off;

        location / {
            return 200 "name $ssl_server_name";
        }
    }

    # a run of failing handshakes, for the warn lines
    server {
        listen       127.0.0.1:8446 ssl;
        server_name  localhost;

        sni_guard_zone    quiet:1m;
        sni_guard_lookup  http://127.0.0.1:%%PORT_8084%%/check;
        sni_guard_breaker 3 2s;

        location / {
            return 200 "name $ssl_server_name";
        }
    }
}

EOF

my $d = $t->testdir();
my ($breaker, $allow, $off, $quiet) = map { "$d/$_" } qw/ breaker allow off quiet /;
mkdir $_ or die "Can't create $_: $!" for $breaker, $allow, $off, $quiet;

make_cert($d, 'localhost');

# Every name is registered: only the service's failures refuse it.
my @fixed = ('stale.example', 'still-open.example', map { "f$_.example" } 1 .. 3);
lookup_conf($breaker, registered => \@fixed);
lookup_conf($allow, mode => 'status 500', registered => [ map { "a$_.example" } 1 .. 4 ]);
lookup_conf($off, mode => 'status 500', registered => [ map { "x$_.example" } 1 .. 20 ]);
lookup_conf($quiet, mode => 'status 500', registered => [ map { "q$_.example" } 1 .. 20 ]);

$t->run_daemon(\&lookup_daemon, port(8081), $breaker);
$t->run_daemon(\&lookup_daemon, port(8082), $allow);
$t->run_daemon(\&lookup_daemon, port(8083), $off);
$t->run_daemon(\&lookup_daemon, port(8084), $quiet);
for my $dir ($breaker, $allow, $off, $quiet) {
	$t->waitforfile("$dir/lookup.pid") or die "lookup service did not start: $dir";
}

$t->plan(18)->run();

###############################################################################

# One raw ClientHello: 'handshake', 'alert N', or what else happened.
sub hello {
	my ($port, $name) = @_;
	my $r = client_hello($port, sni => $name);
	return $r->{outcome} eq 'alert' ? "alert $r->{alert}" : $r->{outcome};
}

# A full handshake and request: 'served' when the page came back.
sub served {
	my ($port, $name) = @_;
	my $r = tls_get($port, $name);
	return ($r->{body} // '') eq "name $name" ? 'served' : 'failed: ' . ($r->{error} // '');
}

# Raw ClientHellos for @names all at once, one process each, released together.
sub concurrent_hellos {
	my ($port, $go, @names) = @_;
	my @pids;
	for my $i (0 .. $#names) {
		my $pid = fork();
		die "Can't fork: $!" unless defined $pid;
		if ($pid == 0) {
			sleep($go - time()) if time() < $go;
			my $outcome = hello($port, $names[$i]);
			if (open my $fh, '>', "$d/hello.$i") {
				print $fh $outcome;
				close $fh;
			}
			POSIX::_exit(0);
		}
		push @pids, $pid;
	}
	# client_hello gives up after 5 s, so every child ends by itself
	waitpid($_, 0) for @pids;
	return map {
		open my $fh, '<', "$d/hello.$_" or die "Can't open $d/hello.$_: $!";
		local $/;
		<$fh> // '';
	} 0 .. $#names;
}

sub requests {
	my ($dir, @names) = @_;
	my $n = 0;
	$n += lookup_count($dir, $_) for @names;
	return $n;
}

# Read without $t: a named sub that holds $t keeps it alive until global
# destruction, too late for the harness's closing checks.
sub error_log {
	open my $fh, '<', "$d/error.log" or die "Can't open $d/error.log: $!";
	local $/;
	return <$fh> // '';
}

# Causes of the warn lines for failed lookups (on handshakes, or in the
# background as refreshes) whose URL starts with $url.
sub failures {
	my ($kind, $url) = @_;
	return error_log()
		=~ /\[warn\] .*sni_guard $kind "\Q$url\E[^"]*" failed: (.*?)(?: while |, client: |$)/mg;
}

sub wait_until {
	my ($when) = @_;
	sleep($when - time()) if time() < $when;
}

###############################################################################

my $port = port(8443);
my $burl = 'http://127.0.0.1:' . port(8081) . '/check';

# before the outage, a name is cached as registered, fresh for 500 ms

is(served($port, 'stale.example') . ', ' . lookup_count($breaker, 'stale.example') . ' lookup',
	'served, 1 lookup', 'service working: a name is looked up and cached as registered');
my $registered = time();

# 3 errors in a row open the breaker

lookup_conf($breaker, mode => 'status 500', registered => \@fixed);

my @names = map { "b$_.example" } 1 .. 3;
my @outcomes = map { hello($port, $_) } @names;
my $opened = time();
is("@outcomes; " . join(' ', map { lookup_count($breaker, $_) } @names),
	'alert 80 alert 80 alert 80; 1 1 1',
	'breaker 3 2s, service answering 500: the first 3 new names are looked up and refused');

@names = map { "b$_.example" } 4 .. 8;
@outcomes = map { hello($port, $_) } @names;
is("@outcomes; " . join(' ', map { lookup_count($breaker, $_) } @names),
	join(' ', ('alert 80') x 5) . '; 0 0 0 0 0',
	'breaker open: the next new names are refused at once, the service is not asked');

my $log = error_log();
my $not_asked = grep {
	$log =~ /\[info\] .*sni_guard refused "\Q$_\E": lookup service failing, not asked/
} @names;
is($not_asked, 5,
	'breaker open: each refusal logged at info as "lookup service failing, not asked"');

# the stale answer is used while the breaker is open (until $opened + 2 s at
# the earliest), and not refreshed

wait_until($registered + 0.7);
is(served($port, 'stale.example'), 'served', 'breaker open: an expired registered name is allowed');

sleep 0.5;
is(lookup_count($breaker, 'stale.example') - 1 . ' refresh requests, '
	. scalar(() = failures('refresh', $burl)) . ' refresh failures',
	'0 refresh requests, 0 refresh failures', 'breaker open: no refresh is sent for it');

# after 2 s a single probe; the service still fails (slowly, so the probe is
# still out when the other handshakes come), the breaker stays open

wait_until($opened + 2.25);
lookup_conf($breaker, mode => 'hang', registered => \@fixed);

@names = map { "p$_.example" } 1 .. 5;
my $go = time() + 0.3;
@outcomes = concurrent_hellos($port, $go, @names);
my $probed = time();
is("@outcomes; " . requests($breaker, @names) . ' request',
	join(' ', ('alert 80') x 5) . '; 1 request',
	'after 2 s: one probe request for 5 concurrent handshakes, all refused as it fails');

# The probe failed at least a timeout (300 ms) after $go: the breaker is open
# until $go + 2.3 s at the earliest.
lookup_conf($breaker, registered => \@fixed);
wait_until($go + 1.5);
is(hello($port, 'still-open.example') . ', ' . lookup_count($breaker, 'still-open.example')
	. ' requests', 'alert 80, 0 requests',
	'failed probe: the breaker stays open another 2 s, the fixed service is not asked');

# ... and it failed before $probed, so the breaker is open until $probed + 2 s
# at the latest.
wait_until($probed + 2.3);
@names = ('still-open.example', map { "f$_.example" } 1 .. 3);
@outcomes = map { served($port, $_) } @names;
is("@outcomes; " . join(' ', map { lookup_count($breaker, $_) } @names),
	'served served served served; 1 1 1 1',
	'service fixed: the probe succeeds, the breaker closes, names are looked up again');

# sni_guard_on_error allow

$port = port(8444);

is(served($port, 'a1.example') . ', ' . lookup_count($allow, 'a1.example') . ' request',
	'served, 1 request', 'on_error allow: a lookup error lets the handshake through');

is(served($port, 'a1.example') . ', ' . lookup_count($allow, 'a1.example') . ' requests',
	'served, 2 requests', 'on_error allow: nothing cached, the next handshake looks up again');

@names = map { "a$_.example" } 2 .. 4;
@outcomes = map { served($port, $_) } @names;
is("@outcomes; " . join(' ', map { lookup_count($allow, $_) } @names),
	'served served served; 1 0 0',
	'on_error allow: the 3rd error opens the breaker, new names let through without asking');

# sni_guard_breaker off

$port = port(8445);
my $ourl = 'http://127.0.0.1:' . port(8083) . '/check';

@names = map { "x$_.example" } 1 .. 20;
my $refused = grep { $_ eq 'alert 80' } map { hello($port, $_) } @names;
is("$refused refused, " . requests($off, @names) . ' requests', '20 refused, 20 requests',
	'breaker off: 20 errors in a row, every new name is looked up');
is(scalar(() = failures('lookup', $ourl)), 20,
	'breaker off: every failed lookup logged at warn');

# the breaker keeps the log quiet: 20 failing handshakes over 2.5 s

$port = port(8446);
my $qurl = 'http://127.0.0.1:' . port(8084) . '/check';

@names = map { "q$_.example" } 1 .. 20;
@outcomes = map { hello($port, $_) } @names[0 .. 2];
my $start = time();
for my $i (3 .. $#names) {
	# the last at 2.5 s: past one cool-down, well short of the next
	wait_until($start + 2.5 * ($i - 3) / ($#names - 3));
	push @outcomes, hello($port, $names[$i]);
}

my ($cause) = failures('lookup', "$qurl?domain=q1.example");
like($cause // 'no such warn line', qr/unexpected status 500/,
	'lookup error at warn: sni_guard lookup "URL?domain=NAME" failed: CAUSE ('
	. ($cause // 'none') . ')');

# The probe is due at the first handshake 2 s after the third: about the
# last ones of the run, or just past it on a busy machine.
$refused = grep { $_ eq 'alert 80' } @outcomes;
my $lines = () = failures('lookup', $qurl);
my $asked = requests($quiet, @names);
ok($refused == 20 && $lines >= 3 && $lines <= 4 && $lines == $asked,
	"breaker 3 2s: 20 failing handshakes ($refused refused) over 2.5 s write $lines warn lines"
	. " for $asked requests: 3 errors and at most 1 probe");

# the breaker says when it opens and when the service answers again

$log = $t->read_file('error.log');
like($log, qr/\[warn\] .*sni_guard zone "\w+": 3 lookup errors in a row, not asking the lookup service for 2000 ms/,
	'the breaker opening is logged at warn');
like($log, qr/\[notice\] .*sni_guard zone "\w+": the lookup service answers again/,
	'the breaker closing is logged at notice');

###############################################################################
