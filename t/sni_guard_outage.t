#!/usr/bin/perl

# Tests for sni_guard: a lookup service that misbehaves - down, hanging, too
# slow, answering 500 or 503, closing mid-body, breaking the status line,
# sending an endless body, redirecting.  Whatever it does, a handshake for a new
# name ends within sni_guard_timeout (+100 ms) and is refused with
# internal_error (80), and nothing is cached: once the service is fixed the
# name is looked up and allowed.  A name cached as registered before the outage
# keeps working for sni_guard_stale after it expires, without waiting, while it
# is refreshed in the background; past valid + stale it is looked up on the
# handshake again, and refused.  Each misbehaviour has its own server, zone and
# lookup service, all run side by side; the breaker is off so that every
# failure reaches the service.

###############################################################################

use warnings;
use strict;

use Test::More;

use POSIX qw/ WNOHANG /;
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

# [ what, key, lookup.conf mode (undef: nothing listens), cause in the warn line ].
my @cases = (
	[ 'service down', 'down', undef, qr/refused/ ],
	[ 'hang', 'hang', 'hang', qr/timed out/ ],
	[ 'answer after the timeout', 'slow', 'slow 1500', qr/timed out/ ],
	[ 'status 500', 's500', 'status 500', qr/500/ ],
	[ 'status 503', 's503', 'status 503', qr/503/ ],
	[ 'closed mid-body', 'partial', 'partial', qr/closed/ ],
	[ 'malformed status line', 'malformed', 'malformed', qr/malformed/ ],
	[ 'endless body', 'endless', 'endless', qr/too large/ ],
	[ 'redirect', 'redirect', 'redirect', qr/redirect 302/ ],
	[ 'status below 100', 's099', 'status 099', qr/internal error/ ],
);

# Case $i: nginx listens on 8441 + $i, its lookup service on 8081 + $i.
my $servers = '';
for my $i (0 .. $#cases) {
	my ($listen, $service, $key) = (8441 + $i, 8081 + $i, $cases[$i][1]);
	$servers .= <<"EOF";
    server {
        listen       127.0.0.1:$listen ssl;
        server_name  localhost;

        sni_guard_zone   $key:1m;
        sni_guard_lookup http://127.0.0.1:%%PORT_$service%%/check;

        location / {
            return 200 "name \$ssl_server_name";
        }
    }

EOF
}

$t->write_file_expand('nginx.conf', <<"EOF");

%%TEST_GLOBALS%%

daemon off;
worker_processes 1;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    ssl_certificate     localhost.crt;
    ssl_certificate_key localhost.key;

    sni_guard on;
    sni_guard_timeout 300ms;
    sni_guard_valid   1s;
    sni_guard_stale   3s;
    sni_guard_breaker off;

$servers}

EOF

my $d = $t->testdir();
make_cert($d, 'localhost');

my (%dir, %port, %service, %url, %kept, %new);
for my $i (0 .. $#cases) {
	my $key = $cases[$i][1];
	$dir{$key} = "$d/$key";
	mkdir $dir{$key} or die "Can't create $dir{$key}: $!";
	$port{$key} = port(8441 + $i);
	$service{$key} = port(8081 + $i);
	$url{$key} = "http://127.0.0.1:$service{$key}/check";
	$kept{$key} = "kept-$key.example";
	$new{$key} = "new-$key.example";
	lookup_conf($dir{$key}, registered => [ $kept{$key} ]);
}

# Every service works at first, to register the kept names; the one that is
# "down" is run here so that it can be stopped, and started again once fixed.
my $down_pid;
for my $case (@cases) {
	my $key = $case->[1];
	if (defined $case->[2]) {
		$t->run_daemon(\&lookup_daemon, $service{$key}, $dir{$key});
	} else {
		$down_pid = fork();
		die "Can't fork: $!" unless defined $down_pid;
		lookup_daemon($service{$key}, $dir{$key}) if $down_pid == 0;
	}
}
for my $key (map { $_->[1] } @cases) {
	$t->waitforfile("$dir{$key}/lookup.pid") or die "lookup service $key did not start";
}

$t->plan(8 * @cases + 2 * grep({ defined $_->[2] } @cases) + 1)->run();

###############################################################################

# sni_guard_timeout 300ms, and 100 ms for everything else
my $bound = 0.4;

# Read without $t: a named sub that holds $t keeps it alive until global
# destruction, too late for the harness's closing checks.
sub error_log {
	open my $fh, '<', "$d/error.log" or die "Can't open $d/error.log: $!";
	local $/;
	return <$fh> // '';
}

# Causes of the warn lines for failed lookups ('lookup', on a handshake) or
# refreshes ('refresh', in the background) of $url.
sub failures {
	my ($kind, $url) = @_;
	return error_log()
		=~ /\[warn\] .*sni_guard $kind "\Q$url\E" failed: (.*?)(?: while |, client: |$)/mg;
}

# A raw ClientHello: 'handshake', 'alert N' or what else happened, and how long
# until the answer came, as the client saw it.
sub timed_hello {
	my ($port, $name) = @_;
	my $start = time();
	my $r = client_hello($port, sni => $name);
	my $took = time() - $start;
	return ($r->{outcome} eq 'alert' ? "alert $r->{alert}" : $r->{outcome}, $took);
}

sub stop_service {
	my ($pid) = @_;
	kill 'TERM', $pid;
	for (1 .. 100) {
		return if waitpid($pid, WNOHANG) != 0;
		sleep 0.1;
	}
	kill 'KILL', $pid;
	waitpid($pid, 0);
}

sub wait_until {
	my ($when) = @_;
	sleep($when - time()) if time() < $when;
}

sub logged {
	my ($case) = @_;
	return defined $case->[2];
}

###############################################################################

# before the outage: a name of each server is looked up and cached as registered,
# by the time its handshake ends: expired 1 s after that, past stale 4 s after

my %end;
for my $case (@cases) {
	my ($what, $key) = @$case;
	my $r;
	# a lookup slowed past the timeout by a busy machine caches nothing: try again
	for (1 .. 3) {
		$r = tls_get($port{$key}, $kept{$key});
		$end{$key} = time();
		last if ($r->{body} // '') eq "name $kept{$key}";
	}
	is($r->{body} // 'no page: ' . ($r->{error} // ''), "name $kept{$key}",
		"$what: before the outage, the name is looked up and served");
}

# the outage

for my $case (@cases) {
	my ($what, $key, $mode) = @$case;
	# the names stay registered: an answer after the timeout says so, too late
	lookup_conf($dir{$key}, mode => $mode, registered => [ $kept{$key}, $new{$key} ])
		if defined $mode;
}
stop_service($down_pid);

# the kept name, expired: allowed from the stale entry, refreshed in the background

my %requests = map { $_ => lookup_count($dir{$_}, $kept{$_}) } keys %dir;
for my $case (@cases) {
	my ($what, $key) = @$case;
	wait_until($end{$key} + 1.25);
	my $start = time();
	my $r = tls_get($port{$key}, $kept{$key});
	my $took = time() - $start;
	is($r->{body} // 'no page: ' . ($r->{error} // ''), "name $kept{$key}",
		"$what: expired name completes from the stale entry");
	ok($took < $bound, sprintf('%s: stale answer without waiting (%.3f s)', $what, $took));
}

# a new name: refused within the timeout

for my $case (@cases) {
	my ($what, $key) = @$case;
	my ($outcome, $took) = timed_hello($port{$key}, $new{$key});
	is($outcome, 'alert 80', "$what: new name refused with internal_error");
	ok($took < $bound, sprintf('%s: new name refused within timeout + 100 ms (%.3f s)',
		$what, $took));
}

# every refresh has failed by now, or within a timeout; 3 s is plenty to see them

my $refreshed = sub {
	my ($case) = @_;
	my $key = $case->[1];
	return scalar failures('refresh', "$url{$key}?domain=$kept{$key}")
		&& (!logged($case) || lookup_count($dir{$key}, $kept{$key}) > $requests{$key});
};
for (1 .. 30) {
	last unless grep { !$refreshed->($_) } @cases;
	sleep 0.1;
}

for my $case (@cases) {
	my ($what, $key, $mode, $cause) = @$case;
	my @causes = failures('refresh', "$url{$key}?domain=$kept{$key}");
	like($causes[0] // 'no such warn line', $cause,
		"$what: failed refresh logged at warn (" . join('; ', @causes) . ')');
	next unless logged($case);
	my $n = lookup_count($dir{$key}, $kept{$key}) - $requests{$key};
	ok($n >= 1, "$what: the service was asked in the background ($n request(s))");
}

# past valid + stale: looked up on the handshake, and refused

for my $case (@cases) {
	my ($what, $key) = @$case;
	wait_until($end{$key} + 4.25);
	my $url = "$url{$key}?domain=$kept{$key}";
	my ($lines, $before) = (scalar(() = failures('lookup', $url)),
		lookup_count($dir{$key}, $kept{$key}));
	my ($outcome) = timed_hello($port{$key}, $kept{$key});
	my $failed = () = failures('lookup', $url);
	is("$outcome, " . ($failed - $lines) . ' failed lookup logged',
		'alert 80, 1 failed lookup logged',
		"$what: past valid + stale, looked up on the handshake and refused");
	next unless logged($case);
	is(lookup_count($dir{$key}, $kept{$key}) - $before, 1,
		"$what: past valid + stale, one request at the service");
}

# the service fixed: nothing was cached for the new names

for my $case (@cases) {
	my ($what, $key) = @$case;
	lookup_conf($dir{$key}, registered => [ $kept{$key}, $new{$key} ]);
}
my ($down) = map { $_->[1] } grep { !logged($_) } @cases;
$t->run_daemon(\&lookup_daemon, $service{$down}, $dir{$down});
$t->waitforfile("$dir{$down}/lookup.pid") or die 'fixed lookup service did not start';

for my $case (@cases) {
	my ($what, $key) = @$case;
	my $before = lookup_count($dir{$key}, $new{$key});
	my ($outcome) = timed_hello($port{$key}, $new{$key});
	my $n = lookup_count($dir{$key}, $new{$key}) - $before;
	is("$outcome, $n lookup", 'handshake, 1 lookup',
		"$what: nothing cached, once fixed the new name is looked up once and completes");
}

# what failed, failed in the module's lines: a panic in the HTTP client (a
# status below 100), caught, must not print Rust's own panic text as well

unlike(error_log(), qr/^thread '.*' panicked at|RUST_BACKTRACE/m,
	'no Rust panic text in the error log');

###############################################################################
