pluginManagement {
    repositories {
        google()
        mavenCentral()
        gradlePluginPortal()
    }
}

dependencyResolutionManagement {
    repositoriesMode.set(RepositoriesMode.FAIL_ON_PROJECT_REPOS)
    repositories {
        google()
        mavenCentral() // org.pytorch:executorch-android and its fbjni / soloader
    }
}

rootProject.name = "DiJiangChat"
include(":app")
