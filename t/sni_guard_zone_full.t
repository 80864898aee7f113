#!/usr/bin/perl

# Tests for sni_guard: a full zone never breaks a handshake.  A zone of the
# minimum size (64k) sees thousands of distinct names, registered and not, some
# over 200 bytes long (they need bigger slab chunks than the others).  Every
# registered name is served and every other one refused with internal_error
# (80), whether its answer could be cached or not; the least recently used
# answers give way to new ones, so a name in constant use stays cached while an
# idle one is looked up again; and "is full" is logged at most once a minute
# per worker, never once per handshake.

###############################################################################

use warnings;
use strict;

use Test::More;

use POSIX ();
use Time::HiRes qw/ time /;

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

    # reuseport spreads the handshakes over both workers, which share the zone
    server {
        listen       127.0.0.1:8443 ssl reuseport;
        server_name  localhost;

        ssl_certificate     localhost.crt;
        ssl_certificate_key localhost.key;

        sni_guard        on;
        sni_guard_zone   small:64k;
        sni_guard_lookup http://127.0.0.1:%%PORT_8081%%/check;

        location / {
            return 200 "name $ssl_server_name";
        }
    }
}

EOF

# Phase one: distinct names passing through, every other one registered, every
# fifth one long.
my $MIXED = 1000;

# Phase two, $ROUNDS times: short unregistered names fill every page of the zone
# with small slab chunks, then long names (every other one registered) come,
# each asked twice in a row: a second lookup shows its first answer could not
# be cached.
my ($ROUNDS, $FILL, $LONGS) = (3, 600, 30);

# The hot names are used again after this many others.
my $HOT_EVERY = 25;

# No run of the loop below may take longer than this, in seconds.
my $TIME_LIMIT = 45;

sub short_name { "s$_[0].fill.example" }

# 202 to 241 bytes: 242 to 281 with the cache's entry header, so both 256 and
# 512 byte slab chunks are needed.
sub long_name {
	my ($i) = @_;
	return join '.', sprintf('l%05d-%s', $i, 'x' x 56), 'y' x 63, 'z' x (20 + $i % 40),
		'w' x 40, 'fill.example';
}

# [ name, registered ] for every step of both phases.
my @mixed = map { [ $_ % 5 ? short_name($_) : long_name($_), $_ % 2 == 0 ] } 1 .. $MIXED;
my (@fill, @longs, @steps);
push @steps, @mixed;
my $n = $MIXED;
for (1 .. $ROUNDS) {
	my @f = map { [ short_name($_), 0 ] } $n + 1 .. $n + $FILL;
	my @l = map { [ long_name($_), $_ % 2 == 0 ] } $n + $FILL + 1 .. $n + $FILL + $LONGS;
	$n += $FILL + $LONGS;
	push @fill, @f;
	push @longs, @l;
	push @steps, @f, map { ($_, $_) } @l;
}

my ($hot, $hot_refused, $cold) = ('hot.fill.example', 'hot-refused.fill.example',
	'cold.fill.example');

my $d = $t->testdir();
make_cert($d, 'localhost');
lookup_conf($d,
	registered => [ $hot, $cold, map { $_->[0] } grep { $_->[1] } @mixed, @longs ]);

$t->run_daemon(\&lookup_daemon, port(8081), $d);
$t->waitforfile("$d/lookup.pid") or die "lookup service did not start";

$t->plan(10)->run();

###############################################################################

my $port = port(8443);

# A registered name, fully: a complete handshake and its page.
sub served {
	my ($name) = @_;
	return (tls_get($port, $name)->{body} // '') eq "name $name";
}

# A registered name, quickly: the server answers the ClientHello with its
# ServerHello, so the guard let the handshake go on.  (A full handshake costs
# some 30 ms of the client's time on a busy machine, too much for thousands.)
sub let_through {
	my ($name) = @_;
	return client_hello($port, sni => $name)->{outcome} eq 'handshake';
}

# Any other name: refused with internal_error.
sub refused {
	my ($name) = @_;
	my $r = client_hello($port, sni => $name);
	return $r->{outcome} eq 'alert' && $r->{alert} == 80;
}

###############################################################################

ok(served($cold), 'a name used once at the start: served');

# Thousands of names pass through; the hot ones are used all along.

my (%tried, @failed);
my $deadline = time() + $TIME_LIMIT;

for my $i (1 .. @steps) {
	last if time() > $deadline;

	my ($name, $registered) = @{$steps[$i - 1]};
	my $how = !$registered ? 'refused' : length $name >= 200 ? 'served' : 'let through';
	my $ok = $how eq 'refused' ? refused($name) : $how eq 'served' ? served($name)
		: let_through($name);
	$tried{$how}++;
	push @failed, "$how: $name" unless $ok;

	next if $i % $HOT_EVERY;

	$tried{'let through'}++;
	push @failed, "let through: $hot" unless let_through($hot);
	$tried{refused}++;
	push @failed, "refused: $hot_refused" unless refused($hot_refused);
}

my $tried = 0;
$tried += $_ for values %tried;
diag(join ', ', map { "$_ $tried{$_}" } sort keys %tried);

is($tried, @steps + 2 * int(@steps / $HOT_EVERY),
	scalar(@steps) . " handshakes done within $TIME_LIMIT s");
is(scalar @failed, 0, 'every registered name served (long ones through a full handshake) '
	. 'and every other one refused with 80, cached or not')
	or diag(join "\n", map { length > 60 ? substr($_, 0, 60) . '...' : $_ }
		@failed[0 .. ($#failed < 9 ? $#failed : 9)]);

my %count;
$count{$_->{domain}}++ for grep { defined $_->{domain} } lookup_log($d);

is(scalar(grep { ($count{$_->[0]} // 0) != 1 } @mixed, @fill), 0,
	'each name asked once looked up once');

# least recently used answers gave way

is($count{$hot}, 1, 'registered name in constant use: stayed cached');
is($count{$hot_refused}, 1, 'unregistered name in constant use: stayed cached');

ok(served($cold), 'the name unused since the start: served again');
is(lookup_count($d, $cold), 2, 'the name unused since the start: looked up again');

# the log

open my $fh, '<', "$d/error.log" or die "Can't open $d/error.log: $!\n";
my @log = <$fh>;
close $fh;

# [ seconds since the epoch, worker pid ] of each "is full" line
my @full;
for (@log) {
	next unless m{^(\d+)/(\d+)/(\d+)[ ](\d+):(\d+):(\d+)[ ]\[warn\][ ](\d+)\#\d+:[ ].*
		sni_guard[ ]zone[ ]"small"[ ]is[ ]full,[ ]answers[ ]are[ ]not[ ]cached}x;
	push @full, [ POSIX::mktime($6, $5, $4, $3, $2 - 1, $1 - 1900), $7 ];
}

# Lines of one worker closer than a minute apart (the log has whole seconds).
my %last;
my $close = 0;
for (@full) {
	my ($when, $pid) = @$_;
	$close++ if defined $last{$pid} && $when - $last{$pid} < 59;
	$last{$pid} = $when;
}

my $uncached = grep { ($count{$_->[0]} // 0) > 1 } @longs;
diag(scalar(@full) . ' "is full" lines, from ' . scalar(keys %last) . " workers; $uncached of "
	. scalar(@longs) . ' long names asked twice were looked up twice (not cached)');

is($close, 0, '"is full" logged at most once a minute per worker: '
	. scalar(@full) . " lines for $tried handshakes");

my @loud = grep { /\[(warn|error|crit|alert|emerg)\]/ && !/ is full, answers are not cached/ }
	@log;
is(scalar @loud, 0, 'no other line at warn or above')
	or diag(join '', @loud[0 .. ($#loud < 9 ? $#loud : 9)]);

###############################################################################
