import org.jetbrains.kotlin.gradle.dsl.JvmTarget

plugins {
    id("com.android.application")
    id("org.jetbrains.kotlin.android")
}

val executorchVersion: String by project

android {
    namespace = "org.dijiang.demo"
    compileSdk = 35

    defaultConfig {
        applicationId = "org.dijiang.demo"
        minSdk = 26
        targetSdk = 35
        versionCode = 1
        versionName = "0.1.0"
        // executorch-android ships these two ABIs: phones, and the x86_64 emulator.
        ndk { abiFilters += listOf("arm64-v8a", "x86_64") }
    }

    buildTypes {
        release {
            isMinifyEnabled = false // the JNI classes of executorch/fbjni must keep their names
        }
    }

    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
}

kotlin {
    compilerOptions { jvmTarget.set(JvmTarget.JVM_17) }
}

dependencies {
    implementation("org.pytorch:executorch-android:$executorchVersion")
    // The core package's tests; run_jvm_tests.sh runs the same ones without Gradle.
    testImplementation("junit:junit:4.13.2")
}
